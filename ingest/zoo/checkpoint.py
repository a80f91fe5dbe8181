"""Zoo checkpoints on disk: the ``zoo.json`` manifest, loading and discovery.

A zoo checkpoint is an ordinary Hugging Face directory (``config.json``,
``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``) plus ``zoo.json``,
written last, which records what was trained and how::

    {"format": "circuitscope-zoo", "format_version": 1,
     "spec": {"task", "task_config", "arch", "shape", "training", "seed"},
     "model_config": {...}, "n_parameters", "metrics", "history", "train_seconds",
     "device", "created_at", "versions": {"python", "torch", "transformers", ...}}

``spec`` is everything that determines the weights (on one device type); two runs with
equal specs are interchangeable, which is how ``circuitscope demo`` reuses a model.
"""

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ingest.errors import InvalidArgumentError, NotFoundError
from ingest.zoo.task import ModelShape, Task, TrainingConfig

log = logging.getLogger(__name__)

MANIFEST = "zoo.json"
#: What a trained checkpoint holds besides the manifest (what ``reuse`` requires).
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
FORMAT = "circuitscope-zoo"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TrainSpec:
    """What determines a zoo model's weights: task (and its parameters), family, sizes, seed."""

    task: str
    task_config: dict[str, Any]
    arch: str
    shape: ModelShape
    training: TrainingConfig
    seed: int

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TrainSpec":
        training = dict(data["training"])
        training["betas"] = tuple(training["betas"])
        return cls(
            task=data["task"],
            task_config=dict(data["task_config"]),
            arch=data["arch"],
            shape=ModelShape(**data["shape"]),
            training=TrainingConfig(**training),
            seed=int(data["seed"]),
        )


@dataclass
class ZooManifest:
    """The parsed ``zoo.json`` of a checkpoint directory."""

    spec: TrainSpec
    metrics: dict[str, float]
    train_seconds: float
    n_parameters: int
    device: str
    created_at: str
    versions: dict[str, str]
    model_config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "spec": self.spec.to_json(),
            "model_config": self.model_config,
            "n_parameters": self.n_parameters,
            "metrics": self.metrics,
            "history": self.history,
            "train_seconds": self.train_seconds,
            "device": self.device,
            "created_at": self.created_at,
            "versions": self.versions,
        }

    def write(self, directory: Path) -> None:
        path = directory / MANIFEST
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n")
        tmp.replace(path)


def read_manifest(directory: str | Path) -> ZooManifest:
    """Parse ``directory/zoo.json``; errors say why the directory is not a zoo checkpoint."""
    directory = Path(directory).expanduser()
    if directory.is_file():
        raise InvalidArgumentError(
            f"{str(directory)!r} is a file: pass a checkpoint directory made by "
            "'circuitscope zoo train' (see 'circuitscope zoo list')"
        )
    if not directory.is_dir():
        raise NotFoundError(
            f"checkpoint directory {str(directory)!r} does not exist: pass a directory made by "
            "'circuitscope zoo train' (see 'circuitscope zoo list')"
        )
    path = directory / MANIFEST
    if not path.is_file():
        raise InvalidArgumentError(
            f"{str(directory)!r} is not a zoo checkpoint (no {MANIFEST}): pass a directory made "
            "by 'circuitscope zoo train' (see 'circuitscope zoo list')"
        )
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"it holds a JSON {type(data).__name__}, not an object")
        if data.get("format") != FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, not {FORMAT!r}")
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {data.get('format_version')!r} is not supported")
        return ZooManifest(
            spec=TrainSpec.from_json(data["spec"]),
            metrics={k: float(v) for k, v in data["metrics"].items()},
            train_seconds=float(data["train_seconds"]),
            n_parameters=int(data["n_parameters"]),
            device=str(data["device"]),
            created_at=str(data["created_at"]),
            versions=dict(data["versions"]),
            model_config=dict(data.get("model_config", {})),
            history=list(data.get("history", [])),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgumentError(
            f"{str(path)!r} is not a valid zoo manifest ({exc}): retrain the model with "
            "'circuitscope zoo train'"
        ) from exc


def task_for_spec(spec: TrainSpec) -> Task:
    """The task instance a spec was trained on (registered task, recorded parameters)."""
    from ingest.zoo.tasks import get_task

    registered = get_task(spec.task)
    if spec.task_config == registered.config():
        return registered
    try:
        return type(registered)(**spec.task_config)  # type: ignore[call-arg]
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(
            f"task parameters {spec.task_config} are not valid for {spec.task!r} ({exc}): "
            "retrain the model with 'circuitscope zoo train'"
        ) from exc


def list_checkpoints(root: str | Path) -> list[tuple[Path, ZooManifest]]:
    """Every readable zoo checkpoint directly under ``root``, sorted by directory name."""
    root = Path(root)
    found: list[tuple[Path, ZooManifest]] = []
    if not root.is_dir():
        return found
    for directory in sorted(
        p for p in root.iterdir() if not p.name.startswith(".") and (p / MANIFEST).is_file()
    ):
        try:
            found.append((directory, read_manifest(directory)))
        except (InvalidArgumentError, NotFoundError) as exc:
            log.warning("skipping %s: %s", directory, exc)
    return found


def default_root() -> Path:
    """Where trained zoo models live: ``ingest.paths.home() / "zoo"``."""
    from ingest.paths import home

    return home() / "zoo"


@dataclass
class LoadedZooModel:
    """A zoo checkpoint loaded the way any hub model is (``AutoModelForCausalLM``)."""

    model: Any
    tokenizer: Any
    task: Task
    manifest: ZooManifest
    directory: Path


def load_zoo_model(directory: str | Path, device: str | None = "cpu") -> LoadedZooModel:
    """Load a zoo checkpoint with ``AutoTokenizer`` / ``AutoModelForCausalLM`` (eager attention)."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ingest.devices import resolve_device

    directory = Path(directory).expanduser()
    manifest = read_manifest(directory)
    task = task_for_spec(manifest.spec)
    target = resolve_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        # transformers would log a multi-line load report; the mismatch is reported here.
        with transformers_quiet():
            loaded: Any = AutoModelForCausalLM.from_pretrained(
                directory,
                attn_implementation="eager",
                dtype=torch.float32,
                ignore_mismatched_sizes=True,
                output_loading_info=True,
            )
        model: torch.nn.Module = loaded[0]
        model_type = str(loaded[0].config.model_type)
        _check_loading_info(loaded[1])
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        # Missing files (OSError), a bad config, tokenizer or weight names (ValueError),
        # weights transformers cannot load (RuntimeError) or a truncated file
        # (SafetensorError). One line: transformers' messages can span several.
        why = next(iter(str(exc).strip().splitlines()), type(exc).__name__)
        raise InvalidArgumentError(
            f"{str(directory)!r} has a zoo.json but its model or tokenizer cannot be loaded "
            f"({why}): retrain it with 'circuitscope zoo train'"
        ) from exc
    _check_family(directory, manifest.spec.arch, model_type)
    model.to(target).eval()
    return LoadedZooModel(model, tokenizer, task, manifest, directory)


@contextmanager
def transformers_quiet() -> Iterator[None]:
    """transformers' own logging at ERROR only and no progress bars, for the duration."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _check_family(directory: Path, arch: str, model_type: str) -> None:
    """The manifest's architecture is a registered one, and the family config.json holds."""
    from ingest.zoo.architectures import ARCHITECTURES

    if arch not in ARCHITECTURES:
        raise InvalidArgumentError(
            f"{str(directory / MANIFEST)!r} names the architecture {arch!r}, which the zoo "
            f"does not have ({', '.join(ARCHITECTURES)}): retrain it with 'circuitscope zoo train'"
        )
    expected = ARCHITECTURES.get(arch).model_type
    if model_type != expected:
        raise InvalidArgumentError(
            f"{str(directory)!r}: {MANIFEST} says {arch!r} (a {expected} model) but "
            f"config.json holds a {model_type} model: retrain it with 'circuitscope zoo train'"
        )


def _check_loading_info(info: dict[str, Any]) -> None:
    """A zoo checkpoint's weights match its config exactly: any missing, unexpected or
    mis-shaped tensor (which transformers would initialise at random) is an error."""
    problems = [
        f"{len(info[kind])} {kind.replace('_', ' ')} (e.g. {sorted(map(str, info[kind]))[0]})"
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
        if info.get(kind)
    ]
    if problems:
        raise ValueError(f"its weights do not fit its config.json: {'; '.join(problems)}")


def evaluate_checkpoint(
    directory: str | Path, device: str | None = "cpu", max_examples: int | None = None
) -> dict[str, float]:
    """Held-out task metrics of the checkpoint in ``directory``; ``max_examples``: at most
    that many, spread evenly over the split (as the trainer's periodic evaluation)."""
    from ingest.zoo.evaluation import evaluate, spread_subset

    loaded = load_zoo_model(directory, device)
    examples = loaded.task.examples("heldout")
    if max_examples is not None:
        examples = spread_subset(examples, max_examples)
    return evaluate(loaded.model, loaded.tokenizer, loaded.task, examples)
