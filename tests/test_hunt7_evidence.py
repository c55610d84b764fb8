"""Fault hunt, round 7, area "evidence": the procedural benchmark's config, its export and its config round trip."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from m2ist.data.files import load_jsonl
from m2ist.data.sample import RECSample
from m2ist.evidence.synthetic import (
    SyntheticRECConfig,
    export_jsonl,
    generate_scene,
    generate_split,
    make_benchmark,
)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("image_size", (64.7, 128.9), "image_size must be a whole number"),
        ("image_size", 128.5, "image_size must be a whole number or a"),
        ("min_objects", 2.5, "min_objects must be a whole number"),
        ("margin", -20, "margin must be >= 1"),
        ("border", -5, "border must be >= 0"),
        ("colour_jitter", -3, "colour_jitter must be >= 0"),
        ("texture_strength", -3, "texture_strength must be >= 0"),
        ("seed", -1, "seed must be >= 0"),
        ("seed", 1.5, "seed must be a whole number"),
        ("position_tolerance", float("nan"), "position_tolerance must be a finite number"),
        ("size_tolerance", -1.0, "size_tolerance must be a finite number"),
        ("position_tolerance", "6", "position_tolerance must be a finite number"),
        ("small_extent", (12.5, 18), "small_extent must be a whole number"),
        ("shapes", "circle", "shapes must be a list of names"),
        ("heldout_pairs", ["circle-green"], "each entry must be a \\(shape, colour\\) pair"),
    ],
)
def test_config_refuses_values_it_would_draw_wrongly_or_truncate(field, value, match):
    with pytest.raises(ValueError, match=match):
        SyntheticRECConfig(**{field: value})


def test_config_refuses_colour_jitter_that_lets_two_colour_names_meet():
    # red (220, 40, 40) and orange (250, 130, 20) differ by 90 at most per channel: a jitter of 45 lets them meet
    with pytest.raises(ValueError, match=r"lets red and orange objects take the same colour.*<= 44"):
        SyntheticRECConfig(colours=("red", "orange"), colour_jitter=45)
    SyntheticRECConfig(colours=("red", "orange"), colour_jitter=44)


def test_config_refuses_extents_at_which_two_shapes_draw_the_same_pixels():
    with pytest.raises(ValueError, match="circle and a diamond of 3 px draw the same pixels"):
        SyntheticRECConfig(small_extent=(3, 4))
    with pytest.raises(ValueError, match="circle of 1 px draws no pixel"):
        SyntheticRECConfig(small_extent=(1, 2))
    SyntheticRECConfig(shapes=("square", "triangle"), small_extent=(4, 6))


def test_config_keeps_whole_numbers_as_python_ints():
    config = SyntheticRECConfig(image_size=[np.int64(100), np.int64(120)], margin=np.int64(3), seed=np.int64(4))
    assert config.image_size == (100, 120) and type(config.margin) is int and type(config.seed) is int
    json.dumps(config.to_dict())


def test_split_and_benchmark_arguments_are_whole_numbers():
    with pytest.raises(ValueError, match="num_images"):
        generate_split("train", 1.5)
    with pytest.raises(ValueError, match="seed"):
        generate_split("train", 1, seed=-1)
    with pytest.raises(ValueError, match=r"sizes=\{'train': ...\}\) must be >= 0"):
        make_benchmark(sizes={"train": -5})


def test_from_dict_names_unknown_fields_and_reads_old_configs_as_they_were_drawn():
    manifest = {"seed": 0, "config": SyntheticRECConfig().to_dict()}
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['config'\] \(pass benchmark.json's"):
        SyntheticRECConfig.from_dict(manifest)
    old = SyntheticRECConfig().to_dict()
    del old["heldout_distractors"]  # a benchmark.json written before the field existed
    with pytest.warns(UserWarning, match="heldout_distractors=True"):
        assert SyntheticRECConfig.from_dict(old).heldout_distractors is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert SyntheticRECConfig.from_dict(SyntheticRECConfig().to_dict()) == SyntheticRECConfig()


def test_generate_scene_excludes_what_it_is_told_or_refuses():
    config = SyntheticRECConfig(shapes=("circle", "square"), colours=("green", "red"), heldout_pairs=())
    with pytest.raises(ValueError, match=r"each entry must be a \(shape, colour\) pair"):
        generate_scene(np.random.default_rng(0), config, excluded_pairs=("circle", "green"))  # one pair, not a list
    with pytest.raises(ValueError, match="it would exclude nothing"):
        generate_scene(np.random.default_rng(0), config, excluded_pairs=[("circle", "Green")])
    with pytest.raises(ValueError, match="also in excluded_pairs"):
        generate_scene(np.random.default_rng(0), config, required_pair=("circle", "green"),
                       excluded_pairs=[("circle", "green")])
    rng = np.random.default_rng(0)
    scenes = [generate_scene(rng, config, excluded_pairs=[("circle", "green")]) for _ in range(10)]
    drawn = {(o.shape, o.colour) for scene in scenes for o in scene.objects}
    assert ("circle", "green") not in drawn


def _pixel(sample: RECSample) -> tuple[int, ...]:
    with Image.open(sample.image) as image:
        return image.getpixel((0, 0))


def test_export_keeps_images_whose_ids_make_the_same_file_name_apart(tmp_path):
    red, blue = Image.new("RGB", (20, 20), (255, 0, 0)), Image.new("RGB", (20, 20), (0, 0, 255))
    samples = [RECSample(red, "the red one", (1, 1, 5, 5), image_id="a/b"),
               RECSample(blue, "the blue one", (1, 1, 5, 5), image_id="a_b"),
               RECSample(red, "red again", (1, 1, 5, 5), image_id="image-000003"),
               RECSample(blue, "no id", (1, 1, 5, 5))]
    loaded = load_jsonl(export_jsonl(samples, tmp_path), box_format="xyxy", image_root=tmp_path)
    assert [_pixel(s) for s in loaded] == [(255, 0, 0), (0, 0, 255), (255, 0, 0), (0, 0, 255)]
    assert [s.image_id for s in loaded] == ["a/b", "a_b", "image-000003", None]


def test_export_refuses_two_images_under_one_id_and_keeps_the_old_index(tmp_path):
    red, blue = Image.new("RGB", (20, 20), (255, 0, 0)), Image.new("RGB", (20, 20), (0, 0, 255))
    (tmp_path / "annotations.jsonl").write_text('{"old": 1}\n')
    with pytest.raises(ValueError, match="Samples 0 and 1 have the same image_id 7 but different images"):
        export_jsonl([RECSample(red, "r", (1, 1, 5, 5), image_id=7), RECSample(blue, "b", (1, 1, 5, 5), image_id=7)],
                     tmp_path)
    with pytest.raises(ValueError, match=r"Sample 1 .* cannot be written as JSON"):
        export_jsonl([RECSample(red, "r", (1, 1, 5, 5), image_id="x"),
                      RECSample(blue, "b", (1, 1, 5, 5), image_id="y", metadata={"n": np.int64(3)})], tmp_path)
    assert (tmp_path / "annotations.jsonl").read_text() == '{"old": 1}\n'
    # one image shared by several expressions is written once
    same = [RECSample(red, "r", (1, 1, 5, 5), image_id=7), RECSample(red.copy(), "r2", (1, 1, 5, 5), image_id=7)]
    export_jsonl(same, tmp_path)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["7.png"]
