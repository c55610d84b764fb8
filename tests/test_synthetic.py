"""The procedural REC benchmark: unique expressions, exact boxes, determinism, split policies, export."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from m2ist.evidence.synthetic import (
    SPLITS,
    Description,
    ExpressionSpec,
    Scene,
    SceneObject,
    SyntheticRECConfig,
    candidate_expressions,
    export_jsonl,
    generate_scene,
    generate_split,
    make_benchmark,
    referents,
    to_hf_dataset,
    to_records,
)

SMALL_SIZES = {
    "train": 30,
    "val": 8,
    "test_attributes": 12,
    "test_compositional": 12,
    "test_relations": 12,
    "test_spatial": 12,
}


@pytest.fixture(scope="module")
def benchmark() -> dict:
    return make_benchmark(sizes=SMALL_SIZES, seed=3)


def _obj(shape: str, colour: str, size: str, box: tuple[int, int, int, int]) -> SceneObject:
    return SceneObject(shape, colour, size, max(box[2] - box[0], box[3] - box[1]), box, (0, 0, 0))


def test_every_expression_names_exactly_its_target(benchmark):
    seen_types = set()
    for name, samples in benchmark.items():
        assert samples, name
        for sample in samples:
            meta = sample.metadata
            scene = Scene.from_dict(meta["scene"])
            spec = ExpressionSpec.from_dict(meta["spec"])
            assert referents(scene, spec) == [meta["target_index"]], sample.expression
            assert spec.text() == sample.expression
            target = scene.objects[meta["target_index"]]
            assert sample.box == tuple(float(v) for v in target.box)
            assert meta["target"] == {"shape": target.shape, "colour": target.colour, "size": target.size}
            assert meta["split"] == name
            seen_types.add(meta["expression_type"])
    assert seen_types == {"attribute", "extreme", "ordinal", "relation"}


def test_splits_hold_only_their_expression_types(benchmark):
    for name, samples in benchmark.items():
        allowed = set(SPLITS[name]["types"])
        assert {s.metadata["expression_type"] for s in samples} <= allowed, name
    assert {s.metadata["expression_type"] for s in benchmark["test_relations"]} == {"relation"}
    assert all(" of the " in s.expression or " above " in s.expression or " below " in s.expression
               for s in benchmark["test_relations"])


def test_heldout_pairs_are_never_train_or_val_targets_and_are_the_compositional_targets(benchmark):
    heldout = set(SyntheticRECConfig().heldout_pairs)
    assert heldout
    for name in ("train", "val", "test_attributes", "test_relations", "test_spatial"):
        for sample in benchmark[name]:
            target = sample.metadata["target"]
            assert (target["shape"], target["colour"]) not in heldout, (name, sample.expression)
            spec = ExpressionSpec.from_dict(sample.metadata["spec"])
            assert not set(spec.pairs_named()) & heldout, (name, sample.expression)
    for sample in benchmark["test_compositional"]:
        target = sample.metadata["target"]
        assert (target["shape"], target["colour"]) in heldout
        assert sample.metadata["heldout_target"] is True
        assert target["shape"] in sample.expression and target["colour"] in sample.expression


def _pairs_drawn(samples) -> set[tuple[str, str]]:
    return {(obj.shape, obj.colour) for s in samples for obj in Scene.from_dict(s.metadata["scene"]).objects}


def test_heldout_pairs_are_never_drawn_outside_the_compositional_split(benchmark):
    """CLEVR-CoGenT's design: a held-out pair is neither named nor seen in training images (nor in the other tests)."""
    heldout = set(SyntheticRECConfig().heldout_pairs)
    for name in ("train", "val", "test_attributes", "test_relations", "test_spatial"):
        drawn = _pairs_drawn(benchmark[name])
        assert not drawn & heldout, (name, drawn & heldout)
    assert len(_pairs_drawn(benchmark["train"])) == 4 * 5 - len(heldout)  # every other pair still appears
    assert _pairs_drawn(benchmark["test_compositional"]) & heldout == heldout


def test_heldout_distractors_brings_back_the_earlier_benchmark():
    config = SyntheticRECConfig(heldout_distractors=True)
    heldout = set(config.heldout_pairs)
    train = generate_split("train", 30, seed=3, config=config)
    assert _pairs_drawn(train) & heldout  # seen as unnamed distractors
    assert not {(s.metadata["target"]["shape"], s.metadata["target"]["colour"]) for s in train} & heldout
    # byte for byte the split m2ist drew before held-out pairs left the training images (digest taken then)
    pixels = b"".join(np.asarray(s.image).tobytes() for s in train)
    assert hashlib.sha256(pixels).hexdigest()[:16] == "7e377e0dfaffd03a"
    assert [s.expression for s in train[:3]] == [
        "the purple shape left of the blue shape", "the large blue shape", "the small green diamond"]
    assert SyntheticRECConfig.from_dict(config.to_dict()).heldout_distractors is True
    with pytest.raises(ValueError, match="heldout_distractors must be True or False"):
        SyntheticRECConfig(heldout_distractors="no")


def test_excluded_pairs_are_never_drawn_and_cannot_exclude_everything():
    config = SyntheticRECConfig(heldout_pairs=())
    excluded = [(shape, colour) for shape in config.shapes for colour in config.colours if colour != "red"]
    rng = np.random.default_rng(0)
    for _ in range(10):
        assert {obj.colour for obj in generate_scene(rng, config, excluded_pairs=excluded).objects} == {"red"}
    everything = excluded + [(shape, "red") for shape in config.shapes]
    with pytest.raises(ValueError, match="no \\(shape, colour\\) pair to draw"):
        generate_scene(rng, config, excluded_pairs=everything)


def _tight_box_of_colour(image: Image.Image, rgb: tuple[int, int, int], region: tuple[int, int, int, int]):
    pixels = np.asarray(image).astype(int)
    x0, y0, x1, y1 = region
    crop = pixels[y0:y1, x0:x1]
    ys, xs = np.nonzero((crop == np.asarray(rgb)).all(axis=-1))
    return (x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1), len(xs)


@pytest.mark.parametrize("background", ["textured", "plain"])
def test_boxes_are_the_tight_boxes_of_the_rendered_pixels(background):
    config = SyntheticRECConfig(background=background, shapes=("circle", "square", "triangle", "diamond", "star"),
                                image_size=(96, 140))
    rng = np.random.default_rng(11)
    for _ in range(25):
        scene = generate_scene(rng, config, with_instance_map=True)
        assert scene.image.size == (scene.width, scene.height)
        for index, obj in enumerate(scene.objects):
            # the pixels of the object's exact colour, searched in its box grown by half the margin (no other
            # object can be there), span exactly the box
            half = config.margin // 2
            region = (max(0, obj.box[0] - half), max(0, obj.box[1] - half),
                      min(scene.width, obj.box[2] + half), min(scene.height, obj.box[3] + half))
            box, count = _tight_box_of_colour(scene.image, obj.rgb, region)
            assert box == obj.box
            assert count == int((scene.instance_map == index + 1).sum())
            ys, xs = np.nonzero(scene.instance_map == index + 1)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == obj.box


def _whole_canvas_mask(shape: str, x0: int, y0: int, extent: int, size: tuple[int, int]) -> np.ndarray:
    """The shape drawn on an image-sized canvas at its own coordinates (the reference the fast renderer must match)."""
    from PIL import ImageDraw

    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    e = extent - 1
    x1, y1, cx, cy = x0 + e, y0 + e, x0 + e / 2.0, y0 + e / 2.0
    outer, inner = e / 2.0, e / 2.0 * 0.45
    star = [(cx + (outer if k % 2 == 0 else inner) * np.cos(-np.pi / 2 + k * np.pi / 5),
             y0 + outer + (outer if k % 2 == 0 else inner) * np.sin(-np.pi / 2 + k * np.pi / 5)) for k in range(10)]
    {"circle": lambda: draw.ellipse((x0, y0, x1, y1), fill=255),
     "square": lambda: draw.rectangle((x0, y0, x1, y1), fill=255),
     "triangle": lambda: draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=255),
     "diamond": lambda: draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=255),
     "star": lambda: draw.polygon(star, fill=255)}[shape]()
    return np.asarray(mask)


@pytest.mark.parametrize("shape", ["circle", "square", "triangle", "diamond", "star"])
def test_shapes_drawn_in_their_own_square_match_the_whole_canvas_drawing(shape):
    # scenes (and the demo tower pretrained on them) must not change when the renderer gets faster: a shape drawn
    # in its own square and pasted at its corner has the pixels it has when drawn on the whole canvas
    from m2ist.evidence.synthetic import _shape_mask

    rng = np.random.default_rng(5)
    for _ in range(40):
        extent = int(rng.integers(3, 40))
        x0, y0 = (int(v) for v in rng.integers(0, 60, size=2))
        expected = _whole_canvas_mask(shape, x0, y0, extent, (100, 100))
        placed = np.zeros((100, 100), dtype=np.uint8)
        placed[y0 : y0 + extent, x0 : x0 + extent] = np.asarray(_shape_mask(shape, extent))
        assert np.array_equal(placed, expected), (shape, extent, x0, y0)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_scenes_respect_counts_margins_and_size_classes(seed):
    config = SyntheticRECConfig()
    scene = generate_scene(np.random.default_rng(seed), config)
    assert config.min_objects <= len(scene.objects) <= config.max_objects
    for i, a in enumerate(scene.objects):
        assert 0 <= a.box[0] < a.box[2] <= scene.width and 0 <= a.box[1] < a.box[3] <= scene.height
        low, high = config.small_extent if a.size == "small" else config.large_extent
        assert low <= a.extent <= high
        assert a.visual_size <= a.extent
        for b in scene.objects[i + 1:]:
            apart = (a.box[2] + config.margin <= b.box[0] or b.box[2] + config.margin <= a.box[0]
                     or a.box[3] + config.margin <= b.box[1] or b.box[3] + config.margin <= a.box[1])
            assert apart


def test_same_seed_gives_identical_images_expressions_and_boxes():
    first = generate_split("train", 15, seed=7)
    second = generate_split("train", 15, seed=7)
    assert [s.expression for s in first] == [s.expression for s in second]
    assert [s.box for s in first] == [s.box for s in second]
    assert [s.image.tobytes() for s in first] == [s.image.tobytes() for s in second]
    other = generate_split("train", 15, seed=8)
    assert [s.image.tobytes() for s in first] != [s.image.tobytes() for s in other]
    val = generate_split("val", 15, seed=7)
    assert first[0].image.tobytes() != val[0].image.tobytes()  # the split name is mixed into the seed


def test_positions_within_the_tolerance_are_a_tie_up_to_its_edge():
    # centres 6 px apart (the default tolerance) are a tie: "the leftmost circle" is ambiguous; 7 px apart are not
    def circles(gap: int) -> list[SceneObject]:
        return [_obj("circle", "red", "small", (10, 10, 20, 20)), _obj("circle", "blue", "small", (10 + gap, 40, 20 + gap, 50)),
                _obj("circle", "red", "small", (80, 80, 90, 90))]

    leftmost = ExpressionSpec("extreme", Description(shape="circle"), direction="left")
    second = ExpressionSpec("ordinal", Description(shape="circle"), direction="left", ordinal=2)
    assert referents(circles(6), leftmost) == [0, 1] and referents(circles(6), second) == [0, 1]
    assert referents(circles(7), leftmost) == [0] and referents(circles(7), second) == [1]


def test_referents_on_a_hand_made_scene():
    objects = [
        _obj("circle", "red", "small", (10, 10, 24, 24)),     # 0: top-left
        _obj("circle", "blue", "large", (40, 60, 70, 90)),    # 1: middle-bottom
        _obj("square", "green", "large", (90, 10, 120, 40)),  # 2: top-right
        _obj("circle", "red", "large", (92, 80, 124, 112)),   # 3: bottom-right
    ]
    scene = Scene(None, objects, 128, 128)

    def spec(**kw) -> ExpressionSpec:
        kind = kw.pop("kind")
        target = Description(**kw.pop("target", {}))
        anchor = kw.pop("anchor", None)
        return ExpressionSpec(kind, target, anchor=None if anchor is None else Description(**anchor), **kw)

    assert referents(scene, spec(kind="attribute", target={"colour": "red"})) == [0, 3]
    assert referents(scene, spec(kind="attribute", target={"colour": "red", "size": "small"})) == [0]
    assert referents(scene, spec(kind="extreme", target={"shape": "circle"}, direction="left")) == [0]
    assert referents(scene, spec(kind="extreme", target={"shape": "circle"}, direction="bottom")) == [3]
    assert referents(scene, spec(kind="extreme", target={"shape": "circle"}, direction="biggest")) == [1, 3]  # tie
    assert referents(scene, spec(kind="extreme", target={}, direction="smallest")) == [0]
    assert referents(scene, spec(kind="ordinal", target={"shape": "circle"}, direction="left", ordinal=2)) == [1]
    assert referents(scene, spec(kind="ordinal", target={}, direction="top", ordinal=3)) == [1]
    above_blue = spec(kind="relation", target={"colour": "red"}, relation="above", anchor={"colour": "blue"})
    assert referents(scene, above_blue) == [0]
    right_of_circle = spec(kind="relation", target={}, relation="right_of", anchor={"shape": "circle", "size": "large"})
    assert referents(scene, right_of_circle) == [2, 3]  # right of the blue circle; the red one is an anchor too
    assert referents(scene, above_blue.to_dict()) == [0]  # the dict form works as well
    assert above_blue.text() == "the red shape above the blue shape"
    assert spec(kind="ordinal", target={"shape": "square"}, direction="left", ordinal=2).text() == \
        "the second square from the left"


def test_candidate_expressions_are_unique_for_every_object_and_kind():
    rng = np.random.default_rng(5)
    config = SyntheticRECConfig()
    for _ in range(10):
        scene = generate_scene(rng, config)
        for target in range(len(scene.objects)):
            for kind in ("attribute", "extreme", "ordinal", "relation"):
                for spec in candidate_expressions(scene, target, kind):
                    assert spec.kind == kind
                    assert referents(scene, spec) == [target]


def test_export_jsonl_round_trips_through_the_loader(tmp_path):
    samples = generate_split("test_attributes", 4, seed=1)
    path = export_jsonl(samples, tmp_path / "attrs")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == len(samples)
    assert all(row["box_format"] == "xyxy" for row in rows)
    assert len(list((tmp_path / "attrs" / "images").glob("*.png"))) == 4  # one file per image, not per expression
    for row, sample in zip(rows, samples):
        assert row["text"] == sample.expression and tuple(row["bbox"]) == sample.box
        with Image.open(tmp_path / "attrs" / row["image"]) as image:
            assert image.tobytes() == sample.image.tobytes()
    from m2ist.data.files import load_jsonl

    loaded = load_jsonl(path, box_format="xyxy", image_root=tmp_path / "attrs")
    assert [s.expression for s in loaded] == [s.expression for s in samples]
    assert [tuple(s.box) for s in loaded] == [s.box for s in samples]


def test_make_benchmark_writes_every_split_and_a_manifest(tmp_path):
    sizes = {name: 2 for name in SPLITS}
    splits = make_benchmark(tmp_path, sizes=sizes, seed=0)
    manifest = json.loads((tmp_path / "benchmark.json").read_text())
    assert set(manifest["splits"]) == set(SPLITS) == set(splits)
    for name in SPLITS:
        assert (tmp_path / name / "annotations.jsonl").is_file()
    config = SyntheticRECConfig.from_dict(manifest["config"])
    assert config == SyntheticRECConfig()


def test_make_benchmark_refuses_to_leave_a_skipped_splits_earlier_export(tmp_path):
    """Exporting again with a split's size 0 left the earlier export's ``root/<split>/`` beside a manifest that
    does not describe it: now refused before any scene is drawn, and nothing is written."""
    make_benchmark(tmp_path, sizes={name: 1 for name in SPLITS}, seed=0)
    before = (tmp_path / "benchmark.json").read_bytes()
    with pytest.raises(ValueError, match=r"test_spatial.*holds an earlier export.*Remove that folder"):
        make_benchmark(tmp_path, sizes={name: 0 if name == "test_spatial" else 1 for name in SPLITS}, seed=1)
    assert (tmp_path / "benchmark.json").read_bytes() == before
    make_benchmark(tmp_path / "fresh", sizes={name: 0 if name == "test_spatial" else 1 for name in SPLITS}, seed=1)
    assert not (tmp_path / "fresh" / "test_spatial").exists()

def test_records_and_hf_dataset():
    samples = generate_split("test_spatial", 2, seed=0)
    rows = to_records(samples)
    assert rows[0]["text"] == samples[0].expression and rows[0]["box_format"] == "xyxy"
    assert rows[0]["expression_type"] in ("extreme", "ordinal")
    assert json.loads(rows[0]["spec"]) == samples[0].metadata["spec"]
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install datasets"):
            to_hf_dataset(samples)
    else:  # pragma: no cover - datasets is not a test dependency
        assert len(to_hf_dataset(samples)) == len(samples)


def test_bad_configs_and_arguments_are_explained():
    with pytest.raises(ValueError, match="separable"):
        SyntheticRECConfig(small_extent=(12, 30), large_extent=(26, 38))
    with pytest.raises(ValueError, match="Unknown shape"):
        SyntheticRECConfig(shapes=("circle", "hexagon"))
    with pytest.raises(ValueError, match="Held-out pair"):
        SyntheticRECConfig(heldout_pairs=(("star", "red"),))
    with pytest.raises(ValueError, match="does not fit"):
        SyntheticRECConfig(image_size=32)
    with pytest.raises(ValueError, match="expression_types"):
        generate_split("my_split", 2)
    with pytest.raises(ValueError, match="Unknown split"):
        make_benchmark(sizes={"test": 3})
    custom = generate_split("my_split", 3, seed=0, expression_types=["extreme"])
    assert {s.metadata["expression_type"] for s in custom} == {"extreme"}


def test_config_image_size_range_and_custom_vocabulary():
    config = SyntheticRECConfig(image_size=(100, 120), shapes=("circle", "star"), colours=("red", "cyan", "orange"))
    samples = generate_split("train", 6, seed=2, config=config)
    sizes = {s.image.size for s in samples}
    assert all(100 <= w <= 120 and 100 <= h <= 120 for w, h in sizes)
    assert {s.metadata["target"]["shape"] for s in samples} <= {"circle", "star"}
    assert dataclasses.replace(config, seed=1).seed == 1
