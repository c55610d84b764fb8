"""Silent faults of the command line and the evidence commands (fault hunt 21): ``~`` and ``$VARS`` in the paths of a
settings file, the umask ignored by the cached demo tower, the evidence children's output decoded with the locale's
encoding, and no way for a command-line user to give a GPT-2-like tokenizer a pad token."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from m2ist.cli import build_parser
from m2ist.cli.data import load_data_splits
from m2ist.cli.errors import CLIError
from m2ist.cli.settings import resolve_settings
from tests.test_hostile import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def _resolve(*argv: str) -> dict:
    return resolve_settings(build_parser(argv[0]).parse_args(list(argv)))


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A home folder (``$HOME``) holding three 60x40 images and ``val.jsonl``; the working directory is elsewhere."""
    home = tmp_path / "home"
    home.mkdir()
    for index in range(3):
        Image.new("RGB", (60, 40), (index * 60, 90, 200)).save(home / f"img{index}.png")
    rows = [{"image": f"img{i}.png", "text": f"the square {i}", "bbox": [5 + i, 5, 20, 15]} for i in range(3)]
    (home / "val.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    monkeypatch.setenv("HOME", str(home))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return home


# ---------------------------------------------------------------------------------------------- 1. ~ and $VARS
def test_a_tilde_in_a_config_files_paths_is_the_home_folder(home):
    """``data: {train_file: ~/val.jsonl}`` in a config file (where no shell expands ``~``) was read as a folder
    named ``~`` in the working directory ("JSONL file not found: ~/val.jsonl"), and ``training.output_dir: ~/out``
    would have written the adapter into ``./~/out``."""
    config = Path("run.yaml")
    config.write_text(yaml.safe_dump({
        "data": {"format": "jsonl", "box_format": "xywh", "train_file": "~/val.jsonl", "image_root": "~",
                 "eval_files": ["val=~/val.jsonl", "~/val.jsonl"]},
        "training": {"output_dir": "~/out", "deepspeed": "~/ds.json"},
        "evaluation": {"output_file": "~/results.json"}}), encoding="utf-8")
    settings = _resolve("train", "--config", str(config), "--vision-model", "~/vit", "--text-model", "t")
    data = settings["data"]
    assert data["train_file"] == str(home / "val.jsonl") and data["image_root"] == str(home)
    assert data["eval_files"] == [f"val={home / 'val.jsonl'}", str(home / "val.jsonl")]
    assert settings["training"] == {"output_dir": str(home / "out"), "deepspeed": str(home / "ds.json")}
    assert settings["evaluation"]["output_file"] == str(home / "results.json")
    assert settings["model"]["vision_model"] == str(home / "vit")
    assert len(load_data_splits(data, "train")["train"]) == 3  # the files are found
    # a flag no shell expands (--output-dir=~/x) and the --config file's own name
    (home / "mine.yaml").write_text("data: {eval_files: {val: ~/val.jsonl}}\n", encoding="utf-8")
    settings = _resolve("eval", "--config=~/mine.yaml", "--adapter=~/run", "--output=~/r.json")
    assert settings["data"]["eval_files"] == {"val": str(home / "val.jsonl")}
    assert settings["model"]["adapter"] == str(home / "run")
    assert settings["evaluation"]["output_file"] == str(home / "r.json")
    assert not Path("~").exists()


def test_an_environment_variable_or_stray_spaces_in_a_settings_path_are_refused(home, monkeypatch):
    """``train_file: $DATA/val.jsonl`` (m2ist expands no variables: only a shell does) was a path starting with a
    folder named ``$DATA``, and ``output_dir: $RUNS/x`` created it; ``"val.jsonl "`` (a quoted YAML or JSON string
    keeps the space) was reported as a missing file whose name looked right."""
    monkeypatch.setenv("DATA", str(home))
    for value, needle in (("$DATA/val.jsonl", "holds $DATA: m2ist does not expand environment variables"),
                          ("${DATA}/val.jsonl", "holds ${DATA}"),
                          (f"{home / 'val.jsonl'} ", "starts or ends with spaces, and no such path exists")):
        Path("run.json").write_text(json.dumps({"data": {"train_file": value}}), encoding="utf-8")
        with pytest.raises(CLIError, match=r"^data\.train_file ") as caught:
            _resolve("train", "--config", "run.json")
        assert needle in str(caught.value)
    with pytest.raises(CLIError, match=r"^training.output_dir '\$RUNS/x' holds \$RUNS"):
        _resolve("train", "--set", "training.output_dir=$RUNS/x")
    assert not Path("$RUNS").exists()
    literal = Path("$keep")  # a path that exists as written is the user's
    literal.mkdir()
    assert _resolve("train", "--output-dir", "$keep")["training"]["output_dir"] == "$keep"


def test_the_command_line_refuses_a_variable_in_one_line(home, capsys):
    """The refusal reaches the user as one ``m2ist train: error:`` line, before any tower is loaded."""
    Path("run.yaml").write_text("training: {output_dir: $OUT/run}\n", encoding="utf-8")
    code, _, err = run_cli(capsys, "train", "--config", "run.yaml", "--vision-model", "v", "--text-model", "t")
    assert_one_line_error(code, err, "training.output_dir '$OUT/run' holds $OUT", "write the path out")


# ---------------------------------------------------------------------------------------------- 2. the umask
def test_the_cached_demo_tower_folder_follows_the_umask(tmp_path):
    """The staged tower folder was chmod'ed 0o755 whatever the umask: a user with umask 077 got a world-readable
    tower in their cache."""
    from m2ist.evidence.demo_towers import VisionPretrainRecipe, load_vision_tower, vision_tower_path

    recipe = VisionPretrainRecipe.tiny()
    old = os.umask(0o077)
    try:
        assert load_vision_tower(cache_dir=tmp_path, recipe=recipe, progress=False) is not None
    finally:
        os.umask(old)
    folder = vision_tower_path(tmp_path, recipe)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


# ---------------------------------------------------------------------------------------------- 3. UTF-8 children
def test_an_evidence_child_writes_and_is_read_as_utf8_under_any_locale(monkeypatch):
    """``compare`` and ``bench`` ran each method's child with ``text=True``: under a non-UTF-8 locale (``LC_ALL=C``
    without Python's UTF-8 mode) a child printing ², × or → died with UnicodeEncodeError, and the parent decoded its
    output with the locale's encoding."""
    from m2ist.evidence.outputs import run_child

    for name, value in (("LC_ALL", "C"), ("LANG", "C"), ("PYTHONCOERCECLOCALE", "0"), ("PYTHONUTF8", "0")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("PYTHONIOENCODING", raising=False)
    words = "M²IST × 4 → 1"
    done = run_child([sys.executable, "-c", f"import sys; print({words!a}); print({words!a}, file=sys.stderr)"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == words and done.stderr.strip() == words


# ---------------------------------------------------------------------------------------------- 4. --pad-token
_WORDS = ["<|endoftext|>", "the", "square", "0", "1", "2", "red", "left"]


def _gpt2_tokenizer(folder: Path | None = None):
    """A word-level GPT-2-like tokenizer: an eos (also bos and unk) token, no pad token."""
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(_WORDS)}, unk_token=_WORDS[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=_WORDS[0], bos_token=_WORDS[0],
                                     unk_token=_WORDS[0])
    if folder is not None:
        fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="module")
def gpt2_towers(tmp_path_factory) -> Path:
    """A tiny ViT and a tiny GPT-2 text tower whose tokenizer has no pad token."""
    import transformers as T

    from tests.tiny import vision_tower

    root = tmp_path_factory.mktemp("gpt2_towers")
    vision_tower("vit").save_pretrained(root / "vit")
    T.GPT2Model(T.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=len(_WORDS), n_positions=64,
                             bos_token_id=0, eos_token_id=0)).save_pretrained(root / "gpt2")
    _gpt2_tokenizer(root / "gpt2")
    return root


def _train_argv(towers: Path, out: Path, *extra: str) -> list[str]:
    from tests.tiny import tiny_config

    fields = {key: getattr(tiny_config(), key) for key in ("bottleneck", "fusion_dim", "fusion_layers", "fusion_heads",
                                                          "fusion_ffn_dim", "max_query_len", "image_size")}
    return ["train", "--vision-model", str(towers / "vit"), "--text-model", str(towers / "gpt2"), "--data-format",
            "jsonl", "--box-format", "xywh", "--output-dir", str(out), "--no-progress", "--set", "training.use_cpu=true",
            "--set", "training.max_steps=1", "--set", "training.eval_strategy=no", "--set", "training.save_strategy=no",
            "--set", "data.augment=false",  # the flips are no part of this test
            *(f"--set=m2ist.{k}={v}" for k, v in fields.items()), *extra]


def test_train_pads_a_gpt2_tokenizer_with_the_token_the_settings_name(home, gpt2_towers, capsys):
    """``m2ist train`` with a GPT-2 text tower stopped at "The tokenizer has no pad token ... tokenizer.pad_token =
    tokenizer.eos_token", which a command-line user cannot do. ``model.pad_token: eos`` (or ``--pad-token``) pads
    with the eos token; it is recorded in m2ist_cli_config.yaml, and the saved processor pads with it."""
    from m2ist.processing import RECProcessor

    code, _, err = run_cli(capsys, *_train_argv(gpt2_towers, home / "none", "--train-file", "~/val.jsonl"))
    assert_one_line_error(code, err, "has no pad token", "m2ist train --pad-token eos")
    Path("run.yaml").write_text("model: {pad_token: eos}\ndata: {train_file: ~/val.jsonl}\n", encoding="utf-8")
    code, _, err = run_cli(capsys, *_train_argv(gpt2_towers, Path("out"), "--config", "run.yaml"))
    assert code == 0, err
    out = Path("out").resolve()
    recorded = yaml.safe_load((out / "m2ist_cli_config.yaml").read_text(encoding="utf-8"))
    assert recorded["model"]["pad_token"] == "eos"
    assert recorded["data"]["train_file"] == str(home / "val.jsonl")  # a resume reads the same file
    assert RECProcessor.from_pretrained(out).tokenizer.pad_token == "<|endoftext|>"
    assert not Path("~").exists()


def test_the_recorded_settings_name_local_paths_absolutely(home, gpt2_towers, capsys):
    """m2ist_cli_config.yaml recorded relative paths as given (``--train-file val.jsonl --output-dir out``): its
    ``--config`` read from another working directory (a resume) read other files of the same names, or none."""
    import shutil

    shutil.copy(home / "val.jsonl", "val.jsonl")
    for index in range(3):
        shutil.copy(home / f"img{index}.png", f"img{index}.png")
    code, _, err = run_cli(capsys, *_train_argv(gpt2_towers, Path("out"), "--pad-token", "eos", "--train-file",
                                                "val.jsonl", "--eval-file", "held=val.jsonl", "--no-final-eval"))
    assert code == 0, err
    recorded = yaml.safe_load(Path("out/m2ist_cli_config.yaml").read_text(encoding="utf-8"))
    here = Path.cwd().resolve()
    assert recorded["training"]["output_dir"] == str(here / "out")
    assert recorded["data"]["train_file"] == str(here / "val.jsonl")
    assert recorded["data"]["eval_files"] == [f"held={here / 'val.jsonl'}"]
    assert recorded["model"]["pad_token"] == "eos" and recorded["model"]["text_model"] == str(gpt2_towers / "gpt2")


@pytest.mark.parametrize(("pad", "needle"), [
    ("[PAD]", "pad_token '[PAD]' is not a token of the text tower's tokenizer"),
    ("sep", "pad_token 'sep': the text tower's tokenizer has no sep token; its special tokens are eos"),
])
def test_a_pad_token_the_tokenizer_does_not_hold_is_refused(pad, needle):
    """A new pad token would get an id past the text tower's vocabulary; a role the tokenizer lacks names those it
    has."""
    from m2ist.processing import set_pad_token

    with pytest.raises(ValueError) as caught:
        set_pad_token(_gpt2_tokenizer(), pad)
    assert str(caught.value).startswith(needle)


def test_a_pad_token_is_applied_by_role_or_as_written_and_never_replaces_one(tmp_path):
    """A token as written is used; a tokenizer that pads already (BERT's [PAD]) keeps its pad token: a different
    one is refused rather than silently changing the ids the tower was trained with."""
    from m2ist.processing import set_pad_token
    from tests.test_inference import make_tokenizer

    tokenizer = _gpt2_tokenizer()
    set_pad_token(tokenizer, "left")
    assert tokenizer.pad_token == "left"
    bert = make_tokenizer(tmp_path / "bert")
    set_pad_token(bert, "[PAD]")  # the same token: nothing changes
    with pytest.raises(ValueError, match=r"pads with '\[PAD\]' already.*leave pad_token unset"):
        set_pad_token(bert, "unk")
    assert bert.pad_token == "[PAD]"


def test_the_processor_builds_for_a_gpt2_tokenizer_with_pad_token(gpt2_towers, tmp_path):
    """In Python, ``RECProcessor.from_pretrained(text_tower, pad_token="eos")`` pads with the tokenizer's eos
    token (without it, the error names the argument and the flag, and no "None: " prefix); the saved processor keeps
    it, and reloading it with another pad token is refused rather than changing the ids."""
    from m2ist.processing import RECProcessor

    with pytest.raises(ValueError, match=r"^The tokenizer has no pad token .*pad_token='eos'.*--pad-token eos"):
        RECProcessor.from_pretrained(gpt2_towers / "gpt2", gpt2_towers / "vit")
    processor = RECProcessor.from_pretrained(gpt2_towers / "gpt2", gpt2_towers / "vit", pad_token="eos")
    assert processor.tokenizer.pad_token == _WORDS[0]
    batch = processor(images=[Image.new("RGB", (8, 8))], text=["the red square"])
    assert batch["input_ids"].shape[0] == 1
    processor.save_pretrained(tmp_path / "saved")
    assert RECProcessor.from_pretrained(tmp_path / "saved", pad_token="eos").tokenizer.pad_token == _WORDS[0]
    with pytest.raises(ValueError, match=r"pads with .* already"):
        RECProcessor.from_pretrained(tmp_path / "saved", pad_token="left")


def test_pad_token_is_a_train_setting_in_its_help(capsys):
    """``--pad-token`` is listed by ``m2ist train --help``; eval and predict load the saved processor and refuse it."""
    with pytest.raises(SystemExit):
        build_parser("train").parse_args(["train", "--help"])
    assert "--pad-token TOKEN" in capsys.readouterr().out
    with pytest.raises(CLIError, match=r"does not read model\.pad_token"):
        _resolve("eval", "--set", "model.pad_token=eos")


def test_a_tilde_after_an_equals_sign_is_the_home_folder_in_every_commands_paths(home, monkeypatch):
    """A shell expands ``~`` only at the start of a word: ``m2ist predict --output=~/boxes.json`` (or ``--draw=``,
    ``--image=``) and ``m2ist demo --output-dir=~/demo`` reached m2ist as written and created a folder named ``~``
    in the working directory. Every path flag outside the settings now reads ``~`` as the home folder."""
    from m2ist.evidence import compare, demo

    args = build_parser("predict").parse_args(["predict", "--adapter", "a", "--image=~/img0.png", "--text", "t",
                                               "--output=~/boxes.json", "--draw=~/drawn.png"])
    assert args.image == [str(home / "img0.png")]
    assert (args.output, args.draw) == (str(home / "boxes.json"), str(home / "drawn.png"))

    seen = {}

    class Stop(Exception):
        pass

    def record(*positional, **named):
        seen.update(named, positional=positional)
        raise Stop

    monkeypatch.setattr(demo, "run", record)
    with pytest.raises(Stop):
        demo.main(["--output-dir=~/demo", "--cache-dir=~/towers", "--tiny"])
    assert seen["positional"] == (str(home / "demo"),) and seen["cache_dir"] == str(home / "towers")
    monkeypatch.setattr(compare, "_isolated", record)  # the first method's child process
    with pytest.raises(Stop):
        compare.main(["--work-dir=~/compare", "--output=~/compare.json", "--tiny"])
    _, parsed = seen["positional"]
    assert (parsed.work_dir, parsed.output) == (str(home / "compare"), str(home / "compare.json"))
    assert not Path("~").exists()
