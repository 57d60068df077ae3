"""MLX backend (`moshi_mlx`) for `mlx`, `mlx:cpu`, `mlx:gpu`, bf16 and the q8/q4 tiers.

It drives upstream's own `moshi_mlx.models.LmGen.step` on the very checkpoint the PyTorch
backend loads (through `Lm.load_pytorch_weights`), so a difference is MLX's, not a re-import's.
moshi_mlx calls `sampler(logits) -> (token, logprobs)` once for text and once per depformer
slice; the samplers handed to `LmGen` here are hooks that give each stream's logits to xbackend.
`mlx` is imported only in this module.
"""

from __future__ import annotations

import os
import tempfile
import contextlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import XBackendError
from ..capture.models import ModelRef, safetensors_header, to_published_layout
from ..spec import BackendSpec
from ..env import gpu_probe, install_hint, metal_available, mlx_unavailable
from .base import Backend, Job, StepRecord, StepRecorder

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
BITS = {"q8": 8, "q4": 4}
GROUP_SIZES = {"q8": 64, "q4": 32}  # moshi_mlx local.py: `32 if args.quantized == 4 else 64`
MLX_GROUP_SIZES = (128, 64, 32)  # what mx.quantize supports
INSTALL = install_hint("mlx")


class MlxBackend(Backend):
    library = "mlx"
    extra = "mlx"
    consumes_late = True  # LmGen reads the user codes passed at step t in step t+1

    def __init__(self, spec: BackendSpec):
        super().__init__(spec)
        if spec.dtype not in DTYPES:
            raise XBackendError(f"Backend {spec} asks for {spec.dtype}",
                                asked="MLX backends run fp32 and bf16, and the quantized tiers q8 and q4 "
                                "(moshi_mlx ships bf16 and q8/q4; MLX has no float64 on the GPU)",
                                fix="use mlx:cpu, mlx:cpu:bf16 or mlx:q8; for fp16 or fp64 use mps:fp16 or cpu:fp64")
        if spec.device not in (None, "cpu", "gpu"):
            raise XBackendError(f"Backend {spec} names device {spec.device!r}",
                                asked="MLX devices are cpu and gpu (left out: MLX's default device)",
                                fix="write e.g. mlx:gpu:bf16")
        self.lm = None
        self.loaded: dict = {}  # what load() settled: origin of the weights, quantized layers

    def unavailable_reason(self) -> str | None:
        return mlx_unavailable(self.spec.device, quantized=self.spec.quant is not None, label=str(self.spec))


    def _device(self):
        import mlx.core as mx

        if self.spec.device == "cpu":
            return mx.Device(mx.cpu)
        if self.spec.device == "gpu":
            return mx.Device(mx.gpu)
        return mx.default_device()

    @contextmanager
    def _on_device(self):
        """Make this backend's device MLX's default for the block: MLX runs ops where the default is."""
        import mlx.core as mx

        previous = mx.default_device()
        mx.set_default_device(self._device())
        try:
            yield
        finally:
            mx.set_default_device(previous)

    def device_name(self) -> str:
        import mlx.core as mx

        device = self._device()
        if device.type == mx.cpu:
            return "cpu"
        ok, said = gpu_probe()
        return f"gpu ({said})" if ok else "gpu"

    def env(self) -> dict:
        import mlx.core as mx

        env = super().env()
        env["mlx_device"] = str(self._device())
        env["mlx_default_device"] = str(mx.default_device())
        env["metal_available"] = metal_available(mx)
        env["MLX_ENABLE_TF32"] = tf32_enabled()
        env["threads"] = os.cpu_count()  # MLX exposes no thread setting; its CPU kernels may use every core
        return env

    def effective(self) -> dict:
        quant = None
        if self.spec.quant:
            quant = {"bits": BITS[self.spec.quant], "group_size": GROUP_SIZES[self.spec.quant]}
        out = {"device": str(self._device()), "dtype": DTYPES[self.spec.dtype], "quant": quant,
               "MLX_ENABLE_TF32": tf32_enabled(), "weights": "pytorch"}
        out.update(self.loaded)
        return out

    def native_sampler(self) -> dict:
        """moshi_mlx's `Sampler` (top-k, temperature, `mx.random.categorical`: Gumbel-max) on the global
        Threefry key; the noise is computed on the device, so CPU and GPU count as different streams."""
        return {"algorithm": "moshi_mlx Sampler: top-k, temperature, categorical (Gumbel-max)",
                "rng": f"MLX Threefry key (mx.random.seed) on {str(self._device()).split('(')[-1].split(',')[0]}"}

    def seed_rng(self, seed: int) -> None:
        import mlx.core as mx

        mx.random.seed(seed)  # the global Threefry key that moshi_mlx's Sampler draws from

    # --- loading -----------------------------------------------------------------------------

    def load(self, model: ModelRef) -> None:
        import mlx.core as mx
        from moshi_mlx.models import Lm, LmConfig

        unsupported = _unsupported(model.config)
        if unsupported:
            raise XBackendError(f"Model {model.name} uses {unsupported}, which moshi_mlx does not implement "
                                "(it hard-codes SiLU gating and RMSNorm)",
                                asked="LmConfig.from_config_dict ignores this key, so MLX would silently "
                                "compute a different model",
                                fix="compare this model with the PyTorch backends only")
        try:
            cfg = LmConfig.from_config_dict(model.config)
        except KeyError as exc:
            raise XBackendError(f"Config of model {model.name} lacks key {exc} that moshi_mlx reads",
                                fix="write every LMModel argument into config.json, as moshi's 7B config does") from None
        with self._on_device():
            lm = Lm(cfg)
            try:
                if model.layout == "mlx":
                    self._load_native(lm, model)
                else:
                    self._load_pytorch(lm, cfg, model)
            except (ValueError, KeyError, IndexError) as exc:
                raise _does_not_fit(model, exc) from None
            lm.set_dtype(getattr(mx, DTYPES[self.spec.dtype]))  # then quantize, as moshi_mlx local.py does
            if self.spec.quant and not model.quant:
                self.loaded["quant"] = self._quantize(lm)
            mx.eval(lm.parameters())
            self.loaded["loaded_on"] = str(mx.default_device())
        self.loaded["device_memory_active_bytes"] = active_memory()
        self.lm = lm

    def _load_pytorch(self, lm, cfg, model: ModelRef) -> None:
        """Upstream's own converter; a per-step state dict is first rewritten to the published layout."""
        import mlx.core as mx

        self.loaded.update(weights="pytorch", layout=model.layout)
        if model.layout != "per_step":
            lm.load_pytorch_weights(str(model.weights), cfg, strict=True)
            return
        with tempfile.TemporaryDirectory(prefix="xbackend-mlx-") as tmp:
            published = Path(tmp) / "model.safetensors"
            mx.save_safetensors(str(published), to_published_layout(mx.load(str(model.weights)), mx.concatenate))
            lm.load_pytorch_weights(str(published), cfg, strict=True)
            mx.eval(lm.parameters())  # read the file before it is deleted (mx.load maps lazily)

    def _load_native(self, lm, model: ModelRef) -> None:
        """An MLX checkpoint (`depformer.slices.*`): quantize the module as the file is, then load it."""
        import mlx.nn as nn

        self.loaded.update(weights="mlx-native", layout="mlx")
        if model.quant != self.spec.quant and model.quant:
            raise XBackendError(f"Model {model.name} is an MLX {model.quant} checkpoint ({model.weights.name})",
                                asked=f"you asked for {self.spec}, and a quantized file cannot be re-quantized",
                                fix=f"use mlx:{model.quant}, or load the PyTorch checkpoint to get other tiers")
        if model.quant:
            bits, header = BITS[model.quant], safetensors_header(model.weights)
            groups: dict[int, int] = {}

            def as_in_file(path: str, module) -> bool | dict:
                scales = header.get(f"{path}.scales")
                if scales is None or not hasattr(module, "to_quantized"):
                    return False
                width = header[f"{path}.weight"]["shape"][-1] * 32 // bits
                group = width // scales["shape"][-1]
                groups[group] = groups.get(group, 0) + 1
                return {"group_size": group, "bits": bits}

            nn.quantize(lm, class_predicate=as_in_file)
            self.loaded["quant"] = {"bits": bits, "group_size": max(groups, key=groups.get) if groups else None,
                                    "layers_by_group_size": groups, "from": "checkpoint"}
        lm.load_weights(str(model.weights), strict=True)

    def _quantize(self, lm) -> dict:
        """`nn.quantize` with upstream's group size (64 for q8, 32 for q4).

        A layer whose input width that group size does not divide (only in toy models: every
        Moshi 7B width is a multiple of 64) takes the largest smaller size MLX supports that
        does, else stays float; the counts are recorded so a report can say how much was quantized.
        """
        import mlx.nn as nn

        bits, preferred = BITS[self.spec.quant], GROUP_SIZES[self.spec.quant]
        sizes = [g for g in MLX_GROUP_SIZES if g <= preferred]
        groups: dict[int, int] = {}
        kept: list[str] = []
        counts = {"quantized": 0, "float": 0}

        def predicate(path: str, module) -> bool | dict:
            if not hasattr(module, "to_quantized"):
                return False
            width = module.weight.shape[-1]
            group = next((g for g in sizes if width % g == 0), None)
            if group is None:
                kept.append(path)
                counts["float"] += module.weight.size
                return False
            groups[group] = groups.get(group, 0) + 1
            counts["quantized"] += module.weight.size
            return {"group_size": group, "bits": bits}

        nn.quantize(lm, group_size=preferred, bits=bits, class_predicate=predicate)
        total = counts["quantized"] + counts["float"]
        return {"bits": bits, "group_size": preferred, "from": "fp weights",
                "layers_by_group_size": groups, "float_layers": len(kept),
                "float_layer_names": kept[:8] + (["..."] if len(kept) > 8 else []),
                "quantized_weight_fraction": round(counts["quantized"] / total, 4) if total else 0.0}

    # --- stepping ----------------------------------------------------------------------------

    def generate(self, job: Job, recorder: StepRecorder, on_step: Callable[[StepRecord], None]) -> None:
        with contextlib.closing(self.steps(job, recorder)) as steps:
            for record in steps:
                on_step(record)

    def steps(self, job: Job, recorder: StepRecorder) -> Iterator[StepRecord]:
        """One step per `next()`; this backend's device is MLX's default only while a step runs."""
        import mlx.core as mx
        from moshi_mlx.models import LmGen

        s = job.sampler.settings
        hooks = _Hooks(recorder, _native_sampler(s.temp_text, s.top_k_text, job.model.vocab[0]),
                       _native_sampler(s.temp_audio, s.top_k_audio, job.model.vocab[1]))
        n_user = job.model.n_user
        with self._on_device():
            for cache in self.lm.transformer_cache:
                cache.reset()
            gen = LmGen(self.lm, max_steps=job.steps + 2, text_sampler=hooks.text, audio_sampler=hooks.audio)
            self.seed_rng(job.seed)
            self.loaded["ran_on"] = str(mx.default_device())  # the stream every op of the run went to
        for t in range(job.steps):
            frame = job.frame(t, self.consumes_late)
            recorder.begin(t)
            with self._on_device():
                gen.step(mx.array(frame.astype(np.int32)).reshape(1, n_user))
                hooks.flush()
            yield recorder.finish(frame)

    def upstream_model(self):
        return self.lm

    def layer_probe(self, entries):
        from .mlx_probe import MlxProbe

        return MlxProbe(self.lm, entries, self._on_device)

    def synchronize(self) -> None:
        import mlx.core as mx

        mx.synchronize()


def tf32_enabled() -> bool:
    """MLX_ENABLE_TF32 as MLX reads it: `atoi` of the variable, on (1) when unset (mlx/utils.h)."""
    raw = os.environ.get("MLX_ENABLE_TF32")
    if raw is None:
        return True
    digits = raw.strip()
    sign = -1 if digits.startswith("-") else 1
    digits = digits.lstrip("+-")
    number = ""
    for c in digits:
        if not c.isdigit():
            break
        number += c
    return sign * int(number or 0) != 0


def active_memory() -> int | None:
    """Bytes MLX's allocator holds (on a Mac the Metal allocator also serves CPU streams)."""
    import mlx.core as mx

    for get in (getattr(mx, "get_active_memory", None), getattr(getattr(mx, "metal", None), "get_active_memory", None)):
        try:
            return int(get())
        except Exception:
            continue
    return None


def _unsupported(config: dict) -> str | None:
    """A config choice moshi_mlx ignores (it hard-codes SiLU gating and RMSNorm), or None.

    Defaults are LMModel's: gating "none", norm "layer_norm", the depformer inheriting both.
    """
    gating = config.get("gating", "none")
    for key, value in (("gating", gating), ("depformer_gating", config.get("depformer_gating", gating))):
        if value != "silu":
            return f"{key} {value!r}"
    norm = config.get("norm", "layer_norm")
    if norm not in ("rms_norm", "rms_norm_f32"):
        return f"norm {norm!r}"
    if config.get("depformer_norm") is not None:
        return f"depformer_norm {config['depformer_norm']!r}"
    return None


def _native_sampler(temp: float, top_k: int, vocab: int):
    """moshi_mlx's own Sampler with xbackend's temperature and top-k, and no top-p.

    Its top-k path needs 0 < k < vocab; a k that keeps every token means plain categorical
    sampling, which the Sampler does when top_k is None and top_p is 0.
    """
    from moshi_mlx.utils.sampling import Sampler

    return Sampler(temp=temp, top_k=top_k if 0 < top_k < vocab else None, top_p=0.0)


def _host(logits) -> np.ndarray:
    """One stream's logits `[1, 1, vocab]` as a float32 numpy vector (numpy has no bfloat16)."""
    import mlx.core as mx

    return np.array(logits.reshape(-1).astype(mx.float32))


class _Hooks:
    """The samplers handed to LmGen: each call is the next stream's decision, in stream order.

    Native sampling without a plugin hook stays on the device: tokens feed the next slice
    lazily, and `flush` evaluates the whole step at once, then records it. Every other mode
    needs xbackend's decision on the host before the next slice runs: one sync per stream.
    """

    def __init__(self, recorder: StepRecorder, text_native, audio_native):
        self.recorder = recorder
        self.text_native, self.audio_native = text_native, audio_native
        self.defer = recorder.native and recorder.on_logits is None
        self.pending: list[tuple] = []

    def text(self, logits):
        return self._sample(logits, self.text_native)

    def audio(self, logits):
        return self._sample(logits, self.audio_native)

    def _sample(self, logits, native):
        import mlx.core as mx

        r = self.recorder
        if self.defer:
            token, logprobs = native(logits)
            self.pending.append((logits, token))
            return token, logprobs
        host = r.take(_host(logits))
        if r.native:  # a plugin hook changed the logits: the native sampler gets its output
            token, logprobs = native(mx.array(host).reshape(logits.shape).astype(logits.dtype))
            r.native_token(int(token.reshape(-1)[0].item()))
            return token, logprobs
        token = mx.full(logits.shape[:-1], r.decide(), dtype=mx.int32)
        return token, logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def flush(self) -> None:
        """Evaluate a deferred step in one go and hand it to the recorder in stream order."""
        import mlx.core as mx

        if not self.pending:
            return
        mx.eval([x for pair in self.pending for x in pair])
        for logits, token in self.pending:
            self.recorder.take(_host(logits))
            self.recorder.native_token(int(token.reshape(-1)[0].item()))
        self.pending = []


def _does_not_fit(model: ModelRef, exc: Exception) -> XBackendError:
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    detail = " ".join(line.strip() for line in lines[:3])[:400]
    if isinstance(exc, KeyError):
        detail = f"tensor {detail} is missing"
    return XBackendError(f"Checkpoint {model.weights} does not fit its config for moshi_mlx ({detail})",
                         asked=f"model {model.name}, layout {model.layout}",
                         fix="pass the config.json that belongs to these weights")
