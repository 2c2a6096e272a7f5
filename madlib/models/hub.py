"""Models and SAEs by parameter: zoo names, Hugging Face hub ids, local directories, LoRA adapters.

:func:`load_model` returns a transformer-lens ``HookedTransformer`` whatever its ``spec`` is:

* a zoo name (``zoo-gpt2``, ``zoo-llama``): :func:`madlib.models.zoo.get_model` at ``preset`` (the base;
  :class:`ModelLoader` loads a zoo name's quirky fine-tune per dataset, as the hub's adapters), or
  the directory of a zoo base model: :func:`madlib.models.zoo.load_dir`;
* a local directory in the Hugging Face format (``config.json``, weights, tokenizer files);
* a hub id (``mistralai/Mistral-7B-v0.1``): its snapshot is fetched into the Hugging Face cache (or
  found there), then loaded exactly as a local directory.

A LoRA ``adapter`` (hub id or directory in peft's format) is merged into the weights with peft
before conversion. The conversion is transformer-lens' own ``HookedTransformer.from_pretrained``
given the loaded model (``hf_model=``), with the architecture read from the model's own config, so
hook names, weight processing (folded norms, centred weights, as for every transformer-lens model
and the SAEs trained on them) and the tokenizer are the same whatever the source. Models load on
CUDA, else MPS, else CPU, in bfloat16 on a GPU and float32 on CPU unless ``device``/``dtype`` say
otherwise; the context is capped at :data:`MAX_CTX` tokens (transformer-lens allocates per-context
buffers).

The hub is probed once with a short timeout (no retries; ``HF_HUB_OFFLINE=1`` skips the probe); a
repository that is neither reachable nor cached fails at once with a one-line
:class:`HubUnavailableError` naming it and saying how to provide a local copy.

:func:`load_sae` loads a pretrained SAE through sae-lens (a release and SAE id, e.g.
``gpt2-small-res-jb``, ``blocks.8.hook_resid_pre``) or a directory in sae-lens' format, and
:func:`sae_latents` encodes a model's activations at the SAE's own hook.
"""

from __future__ import annotations

import contextlib
import io
import re
import tempfile
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..data import datasets as qdata
from . import zoo
from .hooks import hook_layer
from .info import ModelInfo, attach

DTYPES = ("float32", "bfloat16", "float16")
MAX_CTX = 2048
HUB_TIMEOUT = 10.0
"""Seconds the hub probe and each download request may wait."""

_WEIGHTS_IGNORED = (
    "original/*", "*.pth", "*.pt", "*.h5", "*.msgpack", "*.ot", "*.onnx", "*.onnx_data", "*.gguf", "*.tflite",
    "onnx/*", "coreml/*", "flax_model*", "tf_model*", "rust_model*",
)  # fmt: skip
"""Files of a hub snapshot that loading never reads (other frameworks' weights, raw checkpoints)."""
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_TL_NAME_TRIGGERS = ("llama", "gemma", "wav2vec2")
"""Substrings that make transformer-lens pick a config by name instead of reading config.json."""
NAME_ONLY_ARCHITECTURES = ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
"""Architectures transformer-lens converts only from an official model name's built-in config."""


class HubUnavailableError(OSError):
    """A Hugging Face hub repository that can neither be fetched nor found in the local cache."""


# ---------------------------------------------------------------------------------------------
# Device, precision, batch size


def default_device() -> str:
    """``cuda`` if available, else ``mps``, else ``cpu``."""
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def default_dtype(device: str) -> str:
    """bfloat16 on a GPU, float32 on CPU."""
    return "float32" if torch.device(device).type == "cpu" else "bfloat16"


def free_memory(device: str | torch.device) -> int:
    """Bytes free for new tensors on ``device``."""
    d = torch.device(device)
    if d.type == "cuda":
        return torch.cuda.mem_get_info(d)[0]
    if d.type == "mps":
        return max(0, torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    import psutil

    return psutil.virtual_memory().available


def bytes_per_prompt(cfg, n_tokens: int) -> int:
    """Upper estimate of the memory one prompt of ``n_tokens`` needs in an inference forward pass
    (logits over the vocabulary, residual and MLP streams, attention scores), with a factor 2."""
    elem = torch.finfo(cfg.dtype).bits // 8
    d_mlp = cfg.d_mlp or 4 * cfg.d_model
    per_token = elem * (cfg.d_vocab + 6 * cfg.d_model + 3 * d_mlp) + 4 * 2 * cfg.n_heads * n_tokens
    return 2 * n_tokens * per_token


def auto_batch_size(model, n_tokens: int, free_bytes: int | None = None, fraction: float = 0.6, max_batch: int = 512) -> int:
    """Largest batch of prompts of ``n_tokens`` tokens that fits in ``fraction`` of the free memory
    of the model's device (``free_bytes`` overrides the measurement), between 1 and ``max_batch``."""
    free = free_memory(model.cfg.device) if free_bytes is None else free_bytes
    return int(max(1, min(max_batch, fraction * free // bytes_per_prompt(model.cfg, n_tokens))))


def _torch_dtype(dtype: str) -> torch.dtype:
    qdata.check_choice("dtype", dtype, DTYPES)
    return getattr(torch, dtype)


# ---------------------------------------------------------------------------------------------
# Hugging Face hub


def _reason(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:160] if lines else ''}".rstrip(": ")


@contextlib.contextmanager
def hub_offline():
    """Hugging Face hub calls inside the block use the local cache only (no request, no retry)."""
    from huggingface_hub import constants

    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def hub_unreachable(repo_id: str, repo_type: str = "model") -> str | None:
    """None if the hub answers for ``repo_id`` within :data:`HUB_TIMEOUT`, else why not."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, timeout=HUB_TIMEOUT)
    except Exception as e:  # any failure (no network, unknown or gated repository) means: use the cache
        return _reason(e)
    return None


def unavailable_message(param: str, repo_id: str, reason: str, repo_type: str = "model", include: str | None = None) -> str:
    """One line naming the repository and how to provide a local copy."""
    flags = (" --repo-type dataset" if repo_type == "dataset" else "") + (f" --include '{include}'" if include else "")
    return (
        f"{param}={repo_id!r} could not be fetched from the Hugging Face hub nor found in its cache ({reason}); "
        f"download it where the hub is reachable with `hf download {repo_id}{flags} --local-dir <dir>` "
        f"(`huggingface-cli download` in older versions) and pass that directory instead"
    )


def hub_snapshot(
    repo_id: str,
    param: str,
    repo_type: str = "model",
    allow_patterns: list[str] | None = None,
    ignore_patterns: list[str] | None = None,
) -> Path:
    """Local folder of the latest snapshot of ``repo_id``: downloaded if the hub answers, else from
    the cache; :class:`HubUnavailableError` if neither works."""
    from huggingface_hub import snapshot_download

    reason = hub_unreachable(repo_id, repo_type)
    kw = dict(repo_type=repo_type, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns)
    try:
        if reason is None:
            return Path(snapshot_download(repo_id, etag_timeout=HUB_TIMEOUT, **kw))
        with hub_offline():
            return Path(snapshot_download(repo_id, local_files_only=True, **kw))
    except Exception as e:  # the hub's and the cache's errors alike: reported in one line
        raise HubUnavailableError(unavailable_message(param, repo_id, reason or _reason(e), repo_type)) from None


def _weights_snapshot(repo_id: str, param: str) -> Path:
    """Snapshot with safetensors weights only, or with ``.bin`` weights when the repository has no
    safetensors."""
    path = hub_snapshot(repo_id, param, ignore_patterns=[*_WEIGHTS_IGNORED, "*.bin"])
    if not any(path.glob("*.safetensors")):
        path = hub_snapshot(repo_id, param, ignore_patterns=list(_WEIGHTS_IGNORED))
    return path


def resolve(spec: str, param: str) -> tuple[Path, str | None]:
    """A local directory for ``spec`` (a directory, or a hub id fetched/cached) and the hub commit."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve(), None
    if not REPO_ID.match(spec):
        _not_a_spec(spec, param)
    snap = _weights_snapshot(spec, param)
    return snap, snap.name


def _not_a_spec(spec: str, param: str):
    raise ValueError(
        f"{param}={spec!r} is not accepted; give a zoo name {list(zoo.ZOO)}, a Hugging Face hub id (org/name) "
        "or an existing local directory"
    )


def _misspelt_zoo_name(spec: str, param: str):
    import difflib

    close = difflib.get_close_matches(spec.split("@")[0], list(zoo.ZOO), n=1)
    raise ValueError(f"{param}={spec!r} is not accepted; zoo models are {list(zoo.ZOO)}"
                     + (f" (did you mean {close[0]!r}?)" if close else ""))  # fmt: skip


def check_available(specs: list[str], param: str = "model") -> None:
    """Fail at once, in one line, on the first of ``specs`` that cannot be loaded: a misspelt zoo
    name, a path that is not a directory, or a hub id the hub does not answer for and the cache does
    not hold. Nothing is downloaded: a notebook calls this before analysing its first model, so
    that the last model of a list does not fail after the others' analyses."""
    from huggingface_hub import snapshot_download

    for spec in specs:
        if spec in zoo.ZOO or Path(spec).expanduser().is_dir():
            continue
        if spec.startswith("zoo-"):
            _misspelt_zoo_name(spec, param)
        if not REPO_ID.match(spec):
            _not_a_spec(spec, param)
        reason = hub_unreachable(spec)
        if reason is None:
            continue
        try:
            with hub_offline():
                snapshot_download(spec, local_files_only=True, ignore_patterns=list(_WEIGHTS_IGNORED))
        except Exception:
            raise HubUnavailableError(unavailable_message(param, spec, reason)) from None


# ---------------------------------------------------------------------------------------------
# Models


def _load_hf(path: Path, adapter: Path | None, dtype: torch.dtype, spec: str):
    """The Hugging Face model (adapter merged) and tokenizer of a local directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ValueError(f"model={spec!r} is not accepted; {path} has no config.json (not a Hugging Face model directory)")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"model={spec!r} is not accepted; {path} has no usable tokenizer ({_reason(e)})") from None
    if adapter is not None:
        from peft import PeftModel

        hf = PeftModel.from_pretrained(hf, adapter).merge_and_unload()
    for p in hf.parameters():
        p.requires_grad_(False)
    return hf.eval(), tokenizer


def _native_ctx(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def hooked_from_hf(hf, tokenizer, device: str, dtype: torch.dtype, tl_name: str | None = None, **from_pretrained_kwargs):
    """``HookedTransformer.from_pretrained`` on an already loaded Hugging Face model.

    transformer-lens accepts only its official model names; without ``tl_name`` the model's own
    config is written to a temporary directory registered as such a name for the call, so the
    architecture (and every dimension) comes from the model in hand. ``tl_name`` uses the official
    name's built-in config instead (needed for architectures transformer-lens only knows by name,
    e.g. Gemma)."""
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as tl_loading

    native = _native_ctx(hf.config)
    if native is not None and native > MAX_CTX:
        from_pretrained_kwargs.setdefault("n_ctx", MAX_CTX)
    kw = dict(hf_model=hf, tokenizer=tokenizer, device=device, dtype=dtype, default_padding_side="right")
    kw.update(from_pretrained_kwargs)
    quiet = contextlib.redirect_stdout(io.StringIO())
    if tl_name is not None:
        with quiet:
            return HookedTransformer.from_pretrained(tl_name, **kw)
    with tempfile.TemporaryDirectory(prefix="madlib-config-") as config_dir:
        if any(s in config_dir.lower() for s in _TL_NAME_TRIGGERS):
            raise RuntimeError(f"the temporary directory {config_dir} contains one of {_TL_NAME_TRIGGERS}; set TMPDIR elsewhere")
        hf.config.save_pretrained(config_dir)
        tl_loading.OFFICIAL_MODEL_NAMES.append(config_dir)
        try:
            with quiet:
                model = HookedTransformer.from_pretrained(config_dir, **kw)
        finally:
            tl_loading.OFFICIAL_MODEL_NAMES.remove(config_dir)
    model.cfg.tokenizer_name = tokenizer.name_or_path
    return model


def infer_tl_name(config, spec: str) -> str | None:
    """The official transformer-lens name to convert a model with, for the
    :data:`NAME_ONLY_ARCHITECTURES` (None for the others, converted from their own config): the
    spec itself if it is one, else the first official name of the same architecture and shape."""
    from transformer_lens import loading_from_pretrained as tl_loading

    arch = (getattr(config, "architectures", None) or [None])[0]
    if arch not in NAME_ONLY_ARCHITECTURES:
        return None
    aliases = tl_loading.make_model_alias_map()
    if spec.lower() in aliases:
        return aliases[spec.lower()]
    shape = (config.hidden_size, config.num_hidden_layers, config.vocab_size)
    for name in tl_loading.OFFICIAL_MODEL_NAMES:
        if "gemma" not in name.lower():
            continue
        try:  # name-based configs: no hub access
            c = tl_loading.convert_hf_model_config(name)
        except Exception:
            continue
        if c.get("original_architecture") == arch and (c["d_model"], c["n_layers"], c["d_vocab"]) == shape:
            return name
    raise ValueError(
        f"model={spec!r} is a {arch}, which transformer-lens converts only by name; pass tl_name=<its official name>"
    )


def _files_stamp(path: Path) -> dict:
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(path.iterdir()) if f.is_file()}


def model_label(spec: str, adapter: str | None = None) -> str:
    """Short name of a model for tables and figures: the last path component of the spec, plus
    the adapter's."""
    name = Path(spec.rstrip("/")).name or spec
    return name if adapter is None else f"{name}+{Path(adapter.rstrip('/')).name}"


def adapter_for(template: str, model: str, dataset: str) -> str | None:
    """The adapter of ``model`` for ``dataset`` from a template with ``{model}`` (the spec's last
    path component) and ``{dataset}``; ``None`` for an empty template or a zoo model."""
    if not template or model in zoo.ZOO:
        return None
    return template.format(model=Path(model.rstrip("/")).name, dataset=dataset)


def load_model(
    spec: str,
    adapter: str | None = None,
    preset: str = "default",
    device: str | None = None,
    dtype: str | None = None,
    tl_name: str | None = None,
    **from_pretrained_kwargs,
):
    """A ``HookedTransformer`` for a zoo name, hub id or local Hugging Face directory (module doc).

    Args:
        spec: zoo name, hub id or directory.
        adapter: LoRA adapter (hub id or directory, peft format) merged before conversion.
        preset: zoo preset (zoo names only).
        device: ``cuda``, ``mps`` or ``cpu``; default :func:`default_device`.
        dtype: ``float32``, ``bfloat16`` or ``float16``; default :func:`default_dtype`.
        tl_name: official transformer-lens name whose built-in config to use (see :func:`hooked_from_hf`);
            inferred for the :data:`NAME_ONLY_ARCHITECTURES` (Gemma).
        from_pretrained_kwargs: passed to ``HookedTransformer.from_pretrained`` (e.g. ``fold_ln=False``).

    The model's :class:`~madlib.models.info.ModelInfo` carries ``hub`` (spec, resolved path, hub commit or file stamps, adapter,
    dtype), which identifies its weights for caches.
    """
    if spec in zoo.ZOO:
        if adapter is not None:
            raise ValueError(
                f"adapter={adapter!r} is not accepted for the zoo model {spec!r}; adapters apply to Hugging Face models"
            )
        return zoo.get_model(spec, preset=preset)
    if spec.startswith("zoo-") and not Path(spec).exists():
        _misspelt_zoo_name(spec, "model")
    if is_zoo_dir(spec):
        if adapter is not None:
            raise ValueError(f"adapter={adapter!r} is not accepted for the zoo model directory {spec!r}")
        return zoo.load_dir(spec)
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    path, revision = resolve(spec, "model")
    adapter_path, adapter_revision = resolve(adapter, "adapter") if adapter is not None else (None, None)
    hf, tokenizer = _load_hf(path, adapter_path, _torch_dtype(dtype), spec)
    tl_name = tl_name or infer_tl_name(hf.config, spec)
    model = hooked_from_hf(hf, tokenizer, device, _torch_dtype(dtype), tl_name=tl_name, **from_pretrained_kwargs)
    model.eval()
    model.cfg.model_name = model_label(spec, adapter)
    attach(model, ModelInfo(hub=dict(
        spec=spec, path=str(path), revision=revision or _files_stamp(path), adapter=adapter,
        adapter_revision=adapter_revision or (_files_stamp(adapter_path) if adapter_path else None), dtype=dtype,
        tl_name=tl_name, from_pretrained_kwargs=from_pretrained_kwargs,
    )))  # fmt: skip
    check_residual_identities(model, spec)
    return model


SANITY_PROMPT = "Name: Alice\n\n***STATEMENT:*** 2 + 2 = 4.\n\nIs the statement factually correct?"
"""The prompt :func:`check_residual_identities` runs."""


@torch.no_grad()
def check_residual_identities(model, name: str | None = None, rtol: float | None = None) -> None:
    """Assert transformer-lens' residual identities on one prompt: per block,
    ``resid_pre + attn_out == resid_mid`` and ``resid_mid + mlp_out == resid_post`` (parallel
    attention and MLP: ``resid_pre + attn_out + mlp_out == resid_post``; attention only:
    ``resid_pre + attn_out == resid_post``), to a tolerance relative to the stream's largest
    entry (1e-4 in float32, 2e-2 in half precision). A model converted with hooks in the wrong
    place fails here with one line naming the model and the hook."""
    name = name or model.cfg.model_name
    dtype = next(model.parameters()).dtype
    rtol = rtol if rtol is not None else (1e-4 if dtype == torch.float32 else 2e-2)
    tokens = model.to_tokens(SANITY_PROMPT)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")))
    cfg = model.cfg
    for layer in range(cfg.n_layers):
        c = lambda h: cache[f"blocks.{layer}.{h}"].float()  # noqa: E731
        scale = c("hook_resid_post").abs().max().clamp_min(1e-6)
        if cfg.attn_only:
            checks = [("hook_resid_post", c("hook_resid_pre") + c("hook_attn_out"))]
        elif cfg.parallel_attn_mlp:
            checks = [("hook_resid_post", c("hook_resid_pre") + c("hook_attn_out") + c("hook_mlp_out"))]
        else:
            checks = [("hook_resid_mid", c("hook_resid_pre") + c("hook_attn_out")), ("hook_resid_post", c("hook_resid_mid") + c("hook_mlp_out"))]
        for hook, expected in checks:
            err = float((c(hook) - expected).abs().max() / scale)
            if not err <= rtol:
                raise ValueError(f"model={name!r} fails the residual identity at blocks.{layer}.{hook} "
                                 f"(relative error {err:.2g} > {rtol:g}); its hooks do not add up to the residual stream")  # fmt: skip


def is_zoo_dir(spec: str) -> bool:
    """Whether ``spec`` is the directory of a zoo base model (a ``config.json`` with a base config)."""
    import json

    config = Path(str(spec)).expanduser() / "config.json"
    if not config.is_file():
        return False
    try:
        return "base_config" in json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError):
        return False


class ModelLoader:
    """The model of each (spec, dataset) of an analysis grid: ``spec`` with the dataset's adapter
    (:func:`adapter_for`), or for a zoo name its quirky fine-tune on the dataset with seed
    ``seed`` (:func:`madlib.models.zoo.get_model`; ``zoo-gpt2@1`` names seed 1); one model is held at a time, so consecutive datasets
    of a model without adapter reuse it, and an 8B model is never held twice."""

    def __init__(self, adapter: str = "", preset: str = "default", seed: int = 0, **load_kwargs):
        self.adapter, self.preset, self.seed, self.load_kwargs = adapter, preset, seed, load_kwargs
        self._key, self._model = None, None

    def __call__(self, spec: str, dataset: str):
        name, seed = zoo.parse_seeded(spec, self.seed)
        key = (spec, dataset if name in zoo.ZOO else adapter_for(self.adapter, spec, dataset))
        if key != self._key:
            self._model = None  # release the previous model before loading the next
            if name in zoo.ZOO:
                self._model = zoo.get_model(name, preset=self.preset, dataset=dataset, seed=seed)
            else:
                self._model = load_model(spec, adapter=key[1], preset=self.preset, **self.load_kwargs)
            self._key = key
        return self._model


# ---------------------------------------------------------------------------------------------
# SAEs


def load_sae(spec: str, sae_id: str | None = None, device: str | None = None, dtype: str = "float32"):
    """A sae-lens SAE: ``spec`` is a directory in sae-lens' format (``cfg.json`` +
    ``sae_weights.safetensors``; ``sae_id`` names a sub-folder if given) or a pretrained release
    (``gpt2-small-res-jb``) or hub repository with its ``sae_id``."""
    from sae_lens import SAE

    device = device or default_device()
    qdata.check_choice("dtype", dtype, DTYPES)
    path = Path(spec).expanduser()
    if path.is_dir():
        folder = path / sae_id if sae_id else path
        if not (folder / "cfg.json").is_file():
            raise ValueError(f"sae={str(folder)!r} is not accepted; it has no cfg.json (save SAEs with sae-lens' save_model)")
        return SAE.load_from_disk(folder, device=device, dtype=dtype)
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory, get_repo_id_and_folder_name

    releases = get_pretrained_saes_directory()
    if spec in releases:
        ids = list(releases[spec].saes_map)
        if sae_id not in ids:
            more = " ..." if len(ids) > 8 else ""
            raise ValueError(f"sae_id={sae_id!r} is not accepted for release {spec!r}; choose one of {ids[:8]}{more}")
        repo_id, folder = get_repo_id_and_folder_name(spec, sae_id)
    elif "/" in spec and sae_id:
        repo_id, folder = spec, sae_id
    else:
        raise ValueError(
            f"sae={spec!r} is not accepted; give a directory in sae-lens' format, a sae-lens release name with sae_id, "
            "or a hub repository with sae_id"
        )
    from huggingface_hub.errors import HfHubHTTPError

    reason = hub_unreachable(repo_id)
    try:
        if reason is None:
            return SAE.from_pretrained(spec, sae_id, device=device, dtype=dtype)
        with hub_offline():
            return SAE.from_pretrained(spec, sae_id, device=device, dtype=dtype)
    except (OSError, HfHubHTTPError) as e:
        msg = unavailable_message("sae", repo_id, reason or _reason(e), include=f"{folder}/*")
        raise HubUnavailableError(msg.replace("pass that directory", f"pass <dir>/{folder}")) from None


def sae_hook_name(sae) -> str:
    """The transformer-lens hook an SAE reads."""
    hook = sae.cfg.metadata.hook_name
    if not hook:
        raise ValueError("sae has no metadata.hook_name; set sae.cfg.metadata.hook_name to the hook it was trained on")
    return hook


@torch.no_grad()
def sae_latents(model, sae, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_sae"]:
    """SAE latents of ``model``'s activations at the SAE's hook (the forward pass stops there)."""
    hook = sae_hook_name(sae)
    if sae.cfg.d_in != model.cfg.d_model:
        raise ValueError(f"sae d_in={sae.cfg.d_in} does not match the model's d_model={model.cfg.d_model}")
    block = hook_layer(hook)
    stop = None if block is None else block + 1
    _, cache = model.run_with_cache(tokens, names_filter=hook, stop_at_layer=stop)
    return sae.encode(cache[hook].to(device=sae.W_enc.device, dtype=sae.W_enc.dtype))
