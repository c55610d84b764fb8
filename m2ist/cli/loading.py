"""The one place the command line loads towers and adapters (and reports what it loads on stderr)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import CLIError

logger = logging.getLogger("m2ist.cli")


def info(message: str) -> None:
    """A progress message of the command line: on stderr with ``-v``, hidden by default."""
    logger.info(message)

def local_or_hub(name: str) -> str:
    """An existing local path made absolute (so the adapter records where to reload it from), else the Hub id."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name

def load_tower(name: str, revision: str | None, trust_remote_code: bool, role: str = "tower"):
    """``AutoModel.from_pretrained`` of a local folder or a Hub id; a failure is one line naming the tower, whether
    a local folder of that name exists, and offline mode when it is on."""
    import os

    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(local_or_hub(name), revision=revision, trust_remote_code=trust_remote_code)
    except OSError as err:
        local = Path(name).expanduser()
        reason = " ".join(str(err).split())
        if local.exists():
            raise CLIError(f"Cannot load the {role} from the folder {local.resolve()}: {reason}") from err
        offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
        where = ("offline mode is on (HF_HUB_OFFLINE=1) and the Hub cache does not hold it" if offline
                 else f"as a Hub id it could not be loaded ({reason})")
        raise CLIError(f"Cannot load the {role} {name!r}: there is no local folder {local.absolute()}, and {where}."
                       ) from err

def _looks_like_repo_id(name: str) -> bool:
    """``owner/name`` with Hub-legal characters (adapters are always namespaced); paths like ``./x`` or ``a/b/c`` are not."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None and not name.startswith(("./", "../"))

def _refuse_baseline_checkpoint(folder: Path) -> None:
    """Baseline checkpoints (``--method full|adapter|lora``) hold tower tensors a side adapter cannot load: say so."""
    from m2ist.save_and_load import WEIGHTS_NAME, _read_header

    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        return
    try:
        metadata = _read_header(weights).get("__metadata__")
    except (OSError, ValueError):  # a damaged file: the strict loader reports it, naming the file
        return
    method = metadata.get("m2ist_method") if isinstance(metadata, dict) else None
    if method not in (None, "m2ist"):
        raise CLIError(f"{folder} holds a {method!r} baseline checkpoint, not an M²IST side adapter; eval and predict "
                       "load side adapters. In Python: model = m2ist.evidence.baselines.build_model(vision, text, config, "
                       f"method={method!r}); m2ist.trainer.load_trainable_tensors(model, {str(folder)!r}).")

def _checkpoint_step(name: str) -> int:
    """The step of a ``checkpoint-<step>`` folder name (-1 for any other name)."""
    step = name.removeprefix("checkpoint-")
    return int(step) if name.startswith("checkpoint-") and step.isdigit() else -1


def _refuse_folder_without_adapter(folder: Path) -> None:
    """A folder with no ``m2ist_config.json`` of its own (a run's folder that holds only ``checkpoint-*/``, a
    folder above the adapters): refuse it naming the ``--adapter`` that loads one of the adapters it holds."""
    from m2ist.config import CONFIG_NAME

    if not folder.is_dir() or (folder / CONFIG_NAME).is_file():
        return
    held = sorted((sub for sub in folder.iterdir() if (sub / CONFIG_NAME).is_file()),
                  key=lambda sub: (_checkpoint_step(sub.name), sub.name))
    if not held:
        raise CLIError(f"--adapter {folder} holds no {CONFIG_NAME}, nor do its subfolders: give the folder "
                       "`m2ist train` wrote (its --output-dir) or one of its checkpoint-* folders.")
    latest = held[-1] if _checkpoint_step(held[-1].name) >= 0 else held[0]
    names = [sub.name for sub in held]
    shown = names[:8] + ([f"... ({len(names) - 8} more)"] if len(names) > 8 else [])
    raise CLIError(f"--adapter {folder} holds no adapter itself but adapters in its subfolders {shown}: pass one of "
                   f"them, e.g. --adapter {latest}.")


def load_adapter(settings: Mapping[str, Mapping[str, Any]]):
    """``(model, processor)`` from ``model.adapter`` (+ optional tower and processor overrides)."""
    from m2ist.model import SideTunedModel
    from m2ist.processing import PROCESSOR_CONFIG_NAME, RECProcessor
    from m2ist.provenance import same_tower_name

    model_settings = settings["model"]
    adapter = model_settings.get("adapter")
    if not adapter:
        raise CLIError("No adapter: pass --adapter DIR (a folder written by `m2ist train`, or a Hub repo id).")
    if Path(adapter).exists() and not Path(adapter).is_dir():
        raise CLIError(f"--adapter {adapter} is a file; give the folder that holds m2ist_config.json.")
    if not Path(adapter).exists() and not _looks_like_repo_id(adapter):
        raise CLIError(f"Adapter folder not found: {adapter} (give the --output-dir of `m2ist train`, or a Hub repo id "
                       "such as user/m2ist-refcoco).")
    _refuse_baseline_checkpoint(Path(adapter))
    _refuse_folder_without_adapter(Path(adapter))
    trust = bool(model_settings.get("trust_remote_code", False))
    towers = {}
    recorded = _recorded_towers(adapter)
    _refuse_missing_recorded_folders(adapter, recorded, model_settings)
    for modality in ("vision", "text"):
        name = model_settings.get(f"{modality}_model")
        if not name:
            continue
        if not model_settings.get(f"{modality}_revision") and same_tower_name(name, recorded.get(modality)):
            # the name the adapter records (a training config's towers, `--config refcoco`): its pinned commit
            info(f"The {modality} tower {name} is the one the adapter records: loading it at the recorded commit")
            continue
        towers[f"{modality}_model"] = load_tower(name, model_settings.get(f"{modality}_revision"), trust,
                                                  role=f"{modality} tower")
    info(f"Loading the adapter {adapter}")
    model = SideTunedModel.from_pretrained(adapter, **towers, trust_remote_code=trust)
    source = model_settings.get("processor") or _adapter_processor_source(adapter)
    saved_processor = [name for name in (PROCESSOR_CONFIG_NAME, "processor_config.json") if (Path(source) / name).is_file()]
    if Path(source).is_dir() and not saved_processor:
        raise CLIError(f"{source} holds no processor_config.json: pass --processor DIR, the folder a processor was "
                       "saved to (`m2ist train` saves it next to the adapter).")
    try:
        processor = RECProcessor.from_pretrained(source, trust_remote_code=trust or None)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise CLIError(f"{Path(source) / PROCESSOR_CONFIG_NAME}: the processor cannot be restored ({type(err).__name__}: "
                       f"{' '.join(str(err).split())}). Fix that file, or pass --processor DIR.") from err
    if model_settings.get("processor"):
        _warn_if_not_the_adapters_processor(model.processor, processor, adapter, source)
    model.processor = processor
    return model, processor

def _adapter_processor_source(adapter: str) -> str:
    """Where the processor of ``adapter`` lies: the adapter's folder, or the root of the save whose subfolder it is
    (``--adapter out/wide``: ``save_pretrained`` writes the processor its adapters share once, in ``out``)."""
    from m2ist.hub import save_root
    from m2ist.model import adapter_processor_folder

    local = Path(adapter).expanduser()
    found = adapter_processor_folder(local, save_root(local)) if local.is_dir() else None
    if found is not None and found != local:
        info(f"The adapter {adapter} shares the processor saved at the root of its save, {found}")
    return str(found) if found is not None else adapter

def _recorded_towers(adapter: str) -> dict[str, str]:
    """``{modality: name_or_path}`` of the towers ``adapter``'s config records (empty when it cannot be read here:
    loading the adapter reports why)."""
    from m2ist.config import M2ISTConfig

    try:
        config = M2ISTConfig.from_pretrained(adapter)
    except Exception:  # any failure is reported by the load that follows
        return {}
    return {modality: name for modality in ("vision", "text")
            if (name := getattr(config, f"{modality}_model_name_or_path", None))}


def _is_path_name(name: str) -> bool:
    """Whether a tower name can only be a local path: absolute, ``./``, ``../``, ``~``, or not a valid Hub repo id
    (``out/towers/vit``). ``owner/name`` can be either, and stays with the loader."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if Path(name).is_absolute() or name.startswith(("./", "../", "~")) or "\\" in name:
        return True
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return False


def _refuse_missing_recorded_folders(adapter: str, recorded: Mapping[str, str], model_settings: Mapping[str, Any]
                                     ) -> None:
    """A tower the adapter's config records as a local folder that does not exist here (moved, deleted, another
    machine, or a relative path read from another working directory), and that no ``--vision-model`` /
    ``--text-model`` replaces: refuse it naming the field, the file and the flag, before any Hub look-up of the
    path."""
    from m2ist.config import CONFIG_NAME
    from m2ist.provenance import same_tower_name

    where = Path(adapter) / CONFIG_NAME if Path(adapter).is_dir() else f"the {CONFIG_NAME} of the adapter {adapter}"
    for modality in ("vision", "text"):
        name, given = recorded.get(modality), model_settings.get(f"{modality}_model")
        if not name or (given and not same_tower_name(given, name)) or not _is_path_name(name):
            continue
        folder = Path(name).expanduser()
        if folder.exists():
            continue
        relative = "" if Path(name).is_absolute() or name.startswith("~") else \
            f" (a relative path, read from the working directory {Path.cwd()}, not from the adapter folder)"
        raise CLIError(f"{where} records the {modality} tower as {modality}_model_name_or_path={name!r}, a local folder "
                       f"that does not exist here{relative}: pass --{modality}-model with that tower's folder or Hub id.")


def _warn_if_not_the_adapters_processor(own: Any, given: Any, adapter: str, source: str) -> None:
    """``--processor`` replaces the processor saved with the adapter: warn, naming each setting, when it prepares
    images or phrases otherwise than the one the adapter was trained with (a RefCOCO processor's 20 tokens for a
    RefCOCOg adapter trained on 40 cut every long phrase, silently)."""
    from m2ist.processing import describe_differences

    if own is None:
        return
    differ = describe_differences(own.differences(given), "adapter", "--processor")
    if differ:
        logger.warning("--processor %s prepares the inputs otherwise than the processor saved with the adapter %s "
                       "(%s): the boxes will differ from the adapter's own. Leave out --processor to use the "
                       "adapter's.", source, adapter, differ)


def default_device(evaluation: Mapping[str, Any]) -> str | None:
    """``evaluation.device``, else ``cuda`` when a GPU is visible, else ``None`` (stay on the CPU)."""
    import torch

    return evaluation.get("device") or ("cuda" if torch.cuda.is_available() else None)
