"""`EvoPressConfig`: every setting of a compression run, validated at construction."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EvoPressConfig", "CONFIG_NAME", "FITNESS_KINDS", "PRESETS", "GENERIC_SEARCHES"]

CONFIG_NAME = "evopress_config.json"
FITNESS_KINDS = ("kl", "topk_kl", "topk_kl_renormalized", "ppl")
TOPK_FITNESS_KINDS = ("topk_kl", "topk_kl_renormalized")  # those that cache the teacher's top k
PRESETS = ("paper", "cpu")
# Searches that work for every method; methods may add their own baselines.
GENERIC_SEARCHES = ("evolution", "random", "brute_force", "one_at_a_time", "fixed")
MUTATION_RULES = ("size", "all")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _check(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise ValueError(f"EvoPressConfig.{name}: {message}")


def _check_int(value: Any, name: str, minimum: int = 1) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"EvoPressConfig.{name} must be an int >= {minimum}, got {type(value).__name__}")
    _check(value >= minimum, name, f"must be >= {minimum}, got {value}")


def _check_int_list(value: Any, name: str) -> None:
    if value is None:
        return
    if not isinstance(value, (list, tuple)) or not value:
        raise TypeError(f"EvoPressConfig.{name} must be a non-empty list of ints, got {value!r}")
    for item in value:
        _check_int(item, name)


@dataclass
class EvoPressConfig:
    """Settings of one EvoPress compression run.

    Search settings left at `None` take the chosen method's defaults for the chosen `preset`:
    `"paper"` reproduces the paper's settings (meant for a GPU), `"cpu"` is a small preset that
    finishes in minutes on a laptop-class CPU.

    Example:
        ```python
        >>> from optimum_evopress import EvoPressConfig
        >>> config = EvoPressConfig(method="depth", target=0.25, calibration_dataset="wikipedia")
        >>> EvoPressConfig.from_dict(config.to_dict()) == config
        True
        ```
    """

    method: str = field(
        default="depth",
        metadata={"help": "Compression method: `depth` (remove blocks or sub-blocks), `quantization` (GPTQ "
                  "bit-width per layer) or `sparsity` (SparseGPT sparsity per layer)."},
    )
    target: float = field(
        default=0.25,
        metadata={"help": "Global budget. For `depth`: the fraction of units removed, in (0, 1). For "
                  "`quantization`: the average bit-width of the quantized weights, within the `bits` levels. For "
                  "`sparsity`: the fraction of zero weights, in (0, 1), exact in weights."},
    )
    granularity: str | None = field(
        default=None,
        metadata={"help": "Search unit. For `depth`: `block` (default) or `sublayer` (attention and MLP separately). "
                  "For `quantization`: `linear` (default), `fused` (q/k/v and gate/up share a level) or `block`. "
                  "For `sparsity`: `linear` (default) or `block`."},
    )
    search: str = field(
        default="evolution",
        metadata={
            "help": "`evolution` (EvoPress) or a baseline: `random` (best of `initial_candidates`), `brute_force`, "
            "`one_at_a_time`, `fixed` (use `levels`); for `depth` also `shortgpt` and `sliding_window`; for "
            "`quantization` and `sparsity` also `uniform` and `dynamic_programming`; for `sparsity` also `owl`."
        },
    )
    levels: Any = field(
        default=None,
        metadata={"help": "With search=`fixed`: the levels to apply, as `{unit or layer name: level}`, or a path to "
                  "an `evopress_config.json` or a text file of `name: level` lines (the reference format)."},
    )
    bits: list[int] = field(
        default_factory=lambda: [2, 3, 4, 5, 6, 8],
        metadata={"help": "For `quantization`: the bit-widths a unit may take, each in 2..8."},
    )
    group_size: int | None = field(
        default=128, metadata={"help": "For `quantization`: input columns per scale; None for one scale per row."}
    )
    act_order: bool = field(
        default=False, metadata={"help": "For `quantization`: GPTQ in order of decreasing Hessian diagonal."}
    )
    damp_percent: float = field(
        default=0.01, metadata={"help": "For `quantization`: GPTQ dampening, a fraction of the mean Hessian diagonal."}
    )
    calibration_bits: int | str = field(
        default="auto",
        metadata={"help": "For `quantization`: the bit-width the earlier blocks are quantized at while a block's "
                  "Hessians are collected (sequential calibration). `auto`: the smallest level >= target; `dense`: "
                  "every block sees dense inputs."},
    )
    mutation_rule: str | None = field(
        default=None,
        metadata={"help": "`size`: exchange budget only between units of equal size (each size group keeps its "
                  "share of the target, the paper's rule for quantization); `all`: between any units whose level "
                  "changes cost the same. None: the method's default (`size` for quantization, `all` for "
                  "sparsity)."},
    )
    sparsity_step: int | None = field(
        default=None,
        metadata={"help": "For `sparsity`: weights zeroed per level step, the same in every layer, so the budget is "
                  "exact in weights. None: 3% of the mean layer size."},
    )
    sparsity_levels: int = field(
        default=8,
        metadata={"help": "For `sparsity`: levels on each side of the target (levels below 0% or at 100% are left "
                  "out for that layer)."},
    )
    keep_zeros: bool = field(
        default=False,
        metadata={"help": "For `quantization`: weights that are exactly zero stay zero (GPTQ with the sparsity "
                  "mask), e.g. on a model pruned by method `sparsity`; the export keeps the zeros."},
    )
    database_dir: str | None = field(
        default=None,
        metadata={"help": "Directory of the variant database: built there if empty, reused if built with the same "
                  "model, data and settings (else an error). None: in memory only."},
    )
    database_in_memory: bool | None = field(
        default=None,
        metadata={"help": "Hold all variants in memory (True), or read them from `database_dir` through memory maps "
                  "on use (False). None: in memory when they fit in half the available memory."},
    )
    preset: str = field(default="paper", metadata={"help": "Defaults for unset search settings: `paper` or `cpu`."})
    generations: int | None = field(default=None, metadata={"help": "Number of generations of the (1+lambda)-EA."})
    offspring: int | None = field(default=None, metadata={"help": "Offspring (lambda) per generation."})
    survivors_per_selection: list[int] | None = field(
        default=None, metadata={"help": "Candidates kept after each selection stage; non-increasing, ends at 1."}
    )
    tokens_per_selection: list[int] | None = field(
        default=None, metadata={"help": "Calibration tokens scored at each selection stage."}
    )
    initial_candidates: int | None = field(
        default=None, metadata={"help": "Random assignments scored to pick the first parent (best of N)."}
    )
    max_flips: int = field(
        default=3, metadata={"help": "Level switches per offspring: min(U(1, max_flips), U(1, max_flips))."}
    )
    fitness: str = field(default="kl", metadata={
        "help": "`kl` (exact; caches hidden-size floats per token), `topk_kl` (caches k values per token; a lower "
                "bound), `topk_kl_renormalized` (k values per token, computes only k output-head rows: faster, a "
                "different value) or `ppl`."})
    topk: int = field(default=128, metadata={"help": "Teacher probabilities kept per token for the top-k fitnesses."})
    calibration_dataset: Any = field(
        default="wikipedia",
        metadata={
            "help": "Built-in `wikipedia` / `shakespeare`, a local file (text, JSON lines or a JSON array, Parquet, "
            "CSV, Arrow) or folder of them or one written by `save_to_disk`, a Hub dataset name, a "
            "`datasets.Dataset` or `IterableDataset`, or a list of strings (null texts are skipped)."
        },
    )
    calibration_dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    calibration_split: str = field(default="train", metadata={
        "help": "Split of a Hub dataset, or of a DatasetDict saved with `save_to_disk`."})
    text_column: str = field(default="text", metadata={
        "help": "Column (or JSON key) holding the text; its values must be strings."})
    calibration_tokens: int | None = field(default=None, metadata={"help": "Calibration tokens in total."})
    sequence_length: int | None = field(default=None, metadata={"help": "Tokens per calibration sequence."})
    evaluation_tokens: int = field(
        default=8192, metadata={"help": "Held-out tokens for the perplexity reported after compression (0: none)."}
    )
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward pass."})
    reuse_prefix: bool = field(
        default=True,
        metadata={"help": "Run each offspring only from its first block that differs from the parent, replaying "
                  "the parent's hidden states before it (same values, fewer blocks run)."},
    )
    candidate_batch_size: int = field(
        default=1,
        metadata={"help": "Offspring scored together in one forward pass, their sequences stacked and each computed at "
                  "its own levels (same values; fewer, larger passes for accelerators on small models, slower on "
                  "CPUs; capped to fit in memory)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the search and of calibration sampling."})
    device: str | None = field(default=None, metadata={"help": "`cuda`, `cpu`, ...; default: CUDA when present."})
    dtype: str = field(default="auto", metadata={"help": "Compute dtype: `auto` (keep the model's), `float32`, ..."})
    checkpoint_path: str | None = field(
        default=None, metadata={"help": "JSON file the search state is written to (atomically) after each generation."}
    )
    resume_from: str | None = field(
        default=None,
        metadata={"help": "Search state file to resume from. When it equals `checkpoint_path` and does not exist "
                  "yet, the search starts afresh, so one command both starts and resumes a run."},
    )

    def __post_init__(self) -> None:
        from .methods import get_method_class

        if not isinstance(self.method, str):
            raise TypeError(f"EvoPressConfig.method must be a str, got {type(self.method).__name__}")
        method_cls = get_method_class(self.method)
        if isinstance(self.target, bool) or not isinstance(self.target, (int, float)):
            raise TypeError(f"EvoPressConfig.target must be a number, got {type(self.target).__name__}")
        self.target = float(self.target)
        _check(self.preset in PRESETS, "preset", f"must be one of {PRESETS}, got {self.preset!r}")
        allowed_searches = GENERIC_SEARCHES + tuple(method_cls.baselines)
        _check(self.search in allowed_searches, "search", f"must be one of {allowed_searches}, got {self.search!r}")
        _check(self.fitness in FITNESS_KINDS, "fitness", f"must be one of {FITNESS_KINDS}, got {self.fitness!r}")
        _check(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        _check(self.mutation_rule is None or self.mutation_rule in MUTATION_RULES, "mutation_rule",
               f"must be one of {MUTATION_RULES}, got {self.mutation_rule!r}")
        if isinstance(self.bits, tuple):
            self.bits = list(self.bits)
        if isinstance(self.calibration_bits, str) and self.calibration_bits.isdigit():
            self.calibration_bits = int(self.calibration_bits)  # from the command line
        for name in ("act_order", "keep_zeros", "database_in_memory", "reuse_prefix"):
            if not isinstance(getattr(self, name), bool) and not (name == "database_in_memory" and self.database_in_memory
                                                                   is None):
                raise TypeError(f"EvoPressConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.damp_percent, bool) or not isinstance(self.damp_percent, (int, float)):
            raise TypeError(f"EvoPressConfig.damp_percent must be a number, got {self.damp_percent!r}")
        _check(0 < self.damp_percent <= 1, "damp_percent", f"must be in (0, 1], got {self.damp_percent}")
        if self.database_dir is not None:
            self.database_dir = os.fspath(self.database_dir)
            _check(not os.path.isfile(self.database_dir), "database_dir",
                   f"{self.database_dir!r} is a file; give a directory")
        else:
            _check(self.database_in_memory is not False, "database_in_memory", "False needs a database_dir to read from")
        _check((self.search == "fixed") == (self.levels is not None), "levels",
               "give levels exactly when search='fixed'" + (f" (search is {self.search!r})" if self.levels is not None
                                                            else ""))
        if self.levels is not None:
            if isinstance(self.levels, os.PathLike):
                self.levels = os.fspath(self.levels)
            if isinstance(self.levels, str):
                _check(os.path.isfile(self.levels), "levels", f"no file at {self.levels!r}")
            elif not isinstance(self.levels, dict) or not self.levels:
                raise TypeError("EvoPressConfig.levels must be a non-empty dict or a path to a levels file, got "
                                f"{type(self.levels).__name__}")
        for name in ("generations", "offspring", "initial_candidates", "max_flips", "topk", "calibration_tokens",
                     "batch_size", "candidate_batch_size"):
            _check_int(getattr(self, name), name)
        if self.fitness == "topk_kl_renormalized":  # over one token both renormalised distributions are 1
            _check_int(self.topk, "topk", minimum=2)
        _check_int(self.sequence_length, "sequence_length", minimum=2)
        _check_int(self.evaluation_tokens, "evaluation_tokens", minimum=0)
        _check_int(self.seed, "seed", minimum=0)
        _check_int_list(self.survivors_per_selection, "survivors_per_selection")
        _check_int_list(self.tokens_per_selection, "tokens_per_selection")
        for name in ("survivors_per_selection", "tokens_per_selection"):
            if getattr(self, name) is not None:
                setattr(self, name, list(getattr(self, name)))
        if self.device is not None:
            import torch

            try:
                self.device = str(torch.device(self.device))
            except (RuntimeError, TypeError) as err:
                raise ValueError(f"EvoPressConfig.device: {self.device!r} is not a torch device") from err
        for name in ("checkpoint_path", "resume_from"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, (str, os.PathLike)):
                    raise TypeError(f"EvoPressConfig.{name} must be a path, got {type(value).__name__}")
                setattr(self, name, os.fspath(value))
                _check(not os.path.isdir(getattr(self, name)), name,
                       f"{getattr(self, name)!r} is a directory; give the search state's file path")
        self._check_calibration_dataset()
        method_cls.validate_config(self)
        # Cross-field checks on whatever is already known; the rest runs once defaults are resolved.
        self.resolved_search_settings(method_cls.default_settings(self.preset), check_only=True)

    def _check_calibration_dataset(self) -> None:
        if isinstance(self.calibration_dataset, os.PathLike):
            self.calibration_dataset = os.fspath(self.calibration_dataset)
        source = self.calibration_dataset
        if isinstance(source, str):
            _check(bool(source.strip()), "calibration_dataset", "must not be an empty string")
        elif isinstance(source, (list, tuple)):
            _check(len(source) > 0, "calibration_dataset", "must not be an empty list")
            if not all(isinstance(text, str) for text in source):
                raise TypeError("EvoPressConfig.calibration_dataset: a list must hold only strings")
            self.calibration_dataset = list(source)
        elif isinstance(source, dict) or type(source).__name__ in ("DatasetDict", "IterableDatasetDict"):
            splits = list(source) if isinstance(source, dict) else []
            raise ValueError(f"EvoPressConfig.calibration_dataset: a dataset with splits {splits}; pass one split, "
                             f"e.g. dataset[{(splits or ['train'])[0]!r}]")
        elif not hasattr(source, "column_names"):
            raise TypeError(
                "EvoPressConfig.calibration_dataset must be a dataset name, a path, a list of strings or a "
                f"datasets.Dataset, got {type(source).__name__}"
            )

    def resolved_search_settings(self, defaults: dict[str, Any], check_only: bool = False) -> dict[str, Any]:
        """Merges the explicitly set search settings over `defaults` and checks them together.

        With `check_only`, settings still unknown (left to defaults that depend on the model) are skipped.
        """
        names = ("generations", "offspring", "survivors_per_selection", "tokens_per_selection",
                 "initial_candidates", "calibration_tokens", "sequence_length")
        settings = {name: getattr(self, name) if getattr(self, name) is not None else defaults.get(name)
                    for name in names}
        survivors, tokens = settings["survivors_per_selection"], settings["tokens_per_selection"]
        if survivors is not None and tokens is not None:
            _check(
                len(survivors) == len(tokens),
                "tokens_per_selection",
                f"needs one entry per selection stage ({len(survivors)} from survivors_per_selection), got {len(tokens)}",
            )
        if survivors is not None:
            _check(survivors[-1] == 1, "survivors_per_selection", f"the last stage must keep 1 candidate, got {survivors}")
            _check(
                all(a >= b for a, b in zip(survivors, survivors[1:])),
                "survivors_per_selection",
                f"must be non-increasing, got {survivors}",
            )
            if settings["offspring"] is not None:
                _check(
                    survivors[0] <= settings["offspring"],
                    "survivors_per_selection",
                    f"the first stage cannot keep more than the {settings['offspring']} offspring, got {survivors}",
                )
        if tokens is not None and settings["calibration_tokens"] is not None:
            _check(
                max(tokens) <= settings["calibration_tokens"],
                "tokens_per_selection",
                f"a stage asks for {max(tokens)} tokens but calibration_tokens is {settings['calibration_tokens']}; "
                f"allowed range is 1..{settings['calibration_tokens']}",
            )
        if settings["calibration_tokens"] is not None and settings["sequence_length"] is not None:
            _check(
                settings["calibration_tokens"] >= settings["sequence_length"],
                "calibration_tokens",
                f"must hold at least one sequence of sequence_length={settings['sequence_length']} tokens, "
                f"got {settings['calibration_tokens']}",
            )
        if not check_only:
            missing = [name for name, value in settings.items() if value is None]
            if missing:
                raise ValueError(f"EvoPressConfig: no value and no default for {missing}")
        return settings

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; an in-memory `datasets.Dataset` is recorded by its fingerprint."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        source = data["calibration_dataset"]
        if not isinstance(source, (str, list)):
            data["calibration_dataset"] = {
                "in_memory_dataset": getattr(source, "_fingerprint", None),
                "num_rows": getattr(source, "num_rows", None),
            }
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvoPressConfig":
        """Builds a config from `to_dict()` output; unknown keys raise a `ValueError`."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"EvoPressConfig: unknown fields {unknown}; allowed: {sorted(known)}")
        if isinstance(data.get("calibration_dataset"), dict):
            raise ValueError(
                "EvoPressConfig.calibration_dataset: this config was made with an in-memory datasets.Dataset; "
                "pass the dataset again"
            )
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        text = self.to_json_string()  # before the file is opened: a failure leaves no empty file
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "EvoPressConfig":
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        # An `evopress_config.json` written next to a checkpoint wraps the config with the result.
        if "config" in data and isinstance(data["config"], dict):
            data = data["config"]
        return cls.from_dict(data)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Writes `evopress_config.json` into `save_directory` (created if missing)."""
        os.makedirs(save_directory, exist_ok=True)
        self.to_json_file(os.path.join(save_directory, CONFIG_NAME))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **hub_kwargs: Any) -> "EvoPressConfig":
        """Reads a config from `evopress_config.json` (a saved config or checkpoint): a file, a directory holding
        it, or a Hub repo (`hub_kwargs`: `revision`, `token`, ... for `hf_hub_download`)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_NAME)
        elif (not os.path.exists(path) and path.count("/") == 1 and not path.startswith((".", "~", os.sep))
              and not path.endswith(".json")):  # `namespace/name`; anything else is a local path
            from huggingface_hub import hf_hub_download  # noqa: PLC0415
            from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError  # noqa: PLC0415

            try:
                path = hf_hub_download(path, CONFIG_NAME, **hub_kwargs)
            except (EntryNotFoundError, RepositoryNotFoundError) as err:
                raise FileNotFoundError(f"no {CONFIG_NAME} at {path!r}: no local file and no Hub repo with one "
                                        f"({type(err).__name__})") from err
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {CONFIG_NAME} at {path}")
        return cls.from_json_file(path)
