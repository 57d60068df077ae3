"""PyTorch backend (`moshi` package) for `cpu`, `cuda` and `mps` (Mimi lives in `xbackend.codecs`).

It drives upstream's own `moshi.models.lm.LMGen.step`, so users test what they ship; every
sampling decision goes through `moshi.models.lm.sample_token`, which this module replaces for
the duration of a run. Two paths, same traces bit for bit:

- device (the default on CPU and CUDA): the replacement writes logits, tokens and margins into
  static device buffers and takes every decision there, so upstream's CUDA graphs stay on and
  the host receives one copy per step (pipelined one step behind the device);
- host (plugin `on_logits` or `on_load` hooks, MPS, `locate`, or XBACKEND_CAPTURE_PATH=host): every stream's logits go
  to the host, which decides in numpy before the model goes on; no CUDA graphs.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Callable, Iterator

import numpy as np

from ..errors import BackendFailed, BackendUnavailable, XBackendError
from ..capture.models import ModelRef
from ..samplers import effective_top_k, portable_uniforms
from ..spec import BackendSpec
from ..env import install_hint, mps_unavailable
from .base import Backend, Job, StepRecord, StepRecorder

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}
CAPTURE_PATH_ENV = "XBACKEND_CAPTURE_PATH"  # host | device | auto (device unless a plugin hook or MPS)
CAPTURE_PATHS = ("auto", "host", "device")
# moshi's functions wrapped in `torch_compile_lazy`: which of them really got compiled is recorded.
LAZY_COMPILED = (("moshi.modules.transformer", "_rms_norm"), ("moshi.modules.rope", "apply_rope"),
                 ("moshi.modules.gating", "gating_forward_kernel"), ("moshi.utils.utils", "cross_entropy"))
# Words of a state dict that does not fit its model (torch's load_state_dict): bad input, not a device failure.
STATE_DICT_WORDS = ("Error(s) in loading state_dict", "size mismatch", "Missing key", "Unexpected key",
                    "unexpected keyword argument", "missing 1 required", "required positional argument")


class TorchBackend(Backend):
    library = "torch"
    extra = "torch"

    def __init__(self, spec: BackendSpec):
        super().__init__(spec)
        if spec.quant:
            raise XBackendError(f"Backend {spec} asks for quantized tier {spec.quant}",
                                asked="q8/q4 are MLX tiers (mlx:q8, mlx:q4); PyTorch runs fp32, bf16, fp16, fp64",
                                fix=f"use {spec.name}:bf16 or mlx:{spec.quant}")
        if spec.dtype == "fp64" and spec.name != "cpu":
            raise XBackendError(f"Backend {spec} asks for fp64 on {spec.name}",
                                asked="fp64 runs on the CPU only (MPS has no float64; CUDA fp64 is not a shipped path)",
                                fix="use cpu:fp64 as the high-precision reference")
        if spec.device and not (spec.name == "cuda" and spec.device.isdigit()):
            raise XBackendError(f"Backend {spec} names device {spec.device!r}",
                                asked="PyTorch backends are cpu, cuda (or cuda:N) and mps",
                                fix="write e.g. cuda:1:bf16")
        self.device = f"cuda:{spec.device}" if spec.device else spec.name
        self.lm = None
        self.path_choice: str | None = None  # host | device | auto; None reads XBACKEND_CAPTURE_PATH

    @property
    def compile(self) -> bool:
        """Is moshi's lazy torch.compile on for this run? (`compile_choice`, see `torch_compile_wanted`)."""
        return torch_compile_wanted(self.compile_choice)

    def unavailable_reason(self) -> str | None:
        try:
            import moshi  # noqa: F401
            import torch
        except ImportError as exc:
            return f"PyTorch or moshi is not installed ({exc.name}); install with `{install_hint(self.extra)}`"
        if self.spec.name == "cuda" and not torch.cuda.is_available():
            return f"no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'})"
        if self.spec.name == "mps":
            return mps_unavailable(torch) or self._dtype_problem(torch)
        return None

    def _dtype_problem(self, torch) -> str | None:
        """Try the spec's dtype on the device: MPS bf16 needs macOS 14 and says so only when used."""
        if self.spec.dtype == "fp32":
            return None
        try:
            x = torch.ones(2, dtype=getattr(torch, DTYPES[self.spec.dtype]), device=self.device)
            (x * x).sum().item()
        except (RuntimeError, TypeError) as exc:
            return f"{self.spec.dtype} does not run on {self.device} here ({_first_line(exc)})"
        return None

    def accelerator(self):
        """The torch module that synchronizes this backend's device (`torch.mps`, `torch.cuda`), or None."""
        import torch

        return {"mps": getattr(torch, "mps", None), "cuda": torch.cuda}.get(self.spec.name)

    def synchronize(self) -> None:
        module = self.accelerator()
        if module is not None:
            module.synchronize()

    def device_name(self) -> str:
        import torch

        if self.spec.name == "cuda" and torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.device(self.device))
        if self.spec.name == "mps":
            return "Apple MPS"
        return "cpu"

    def env(self) -> dict:
        import torch

        env = super().env()
        env["threads"] = torch.get_num_threads()
        if self.spec.name == "cuda" and torch.cuda.is_available():
            env["cuda"] = torch.version.cuda
            env["cudnn"] = torch.backends.cudnn.version()
        return env

    def effective(self) -> dict:
        import torch

        path = self.capture_path()
        graphs = self.spec.name == "cuda" and path == "device" and _cuda_graphs_allowed()
        compiled = compiled_by_moshi() if self.compile else []
        out = {"cuda_graphs": graphs, "compile": self.compile_choice, "torch_compile": bool(compiled),
               "torch_compile_requested": self.compile, "torch_compiled": compiled, "capture_path": path}
        if self.lm is not None:  # where the weights really are, not where they were asked to be
            out["weights_device"] = str(next(self.lm.parameters()).device)
            out["weights_dtype"] = str(next(self.lm.parameters()).dtype).replace("torch.", "")
        if self.spec.name == "cuda":
            out["allow_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
            out["allow_tf32_cudnn"] = torch.backends.cudnn.allow_tf32
        if self.spec.name == "mps":  # read by torch as "set to 1" (PyTorch's MPS environment variables)
            out["mps_fast_math"] = os.environ.get("PYTORCH_MPS_FAST_MATH", "").strip() == "1"
            out["mps_prefer_metal"] = os.environ.get("PYTORCH_MPS_PREFER_METAL", "").strip() == "1"
            out["mps_fallback"] = os.environ.get("PYTORCH_ENABLE_MPS_FALLBACK", "").strip() == "1"
        return out

    def native_sampler(self) -> dict:
        """moshi's `sample_token` on float32 logits (LMGen casts them, whatever the dtype) with the
        device's global generator: CPU, CUDA and MPS generators draw different streams for one seed."""
        rng = {"cpu": "torch CPU generator (mt19937)", "cuda": "torch CUDA generator (Philox4x32-10)",
               "mps": "torch MPS generator"}.get(self.spec.name, f"torch {self.spec.name} generator")
        return {"algorithm": "moshi sample_token: top-k, temperature, exponential race argmax(p / Exp(1)), float32",
                "rng": rng}

    def seed_rng(self, seed: int) -> None:
        import torch

        torch.manual_seed(seed)  # seeds CPU, CUDA and MPS generators

    def load(self, model: ModelRef) -> None:
        import torch
        from moshi.models.loaders import get_moshi_lm

        if model.layout == "mlx":
            raise XBackendError(f"Model {model.name} is an MLX-native checkpoint ({model.weights.name})",
                                asked="PyTorch backends load PyTorch checkpoints only",
                                fix="compare it with mlx backends, or use the PyTorch repository of the same model")
        try:
            self.lm = get_moshi_lm(model.weights, lm_kwargs=model.config, device=self.device,
                                   dtype=getattr(torch, DTYPES[self.spec.dtype]))
        except (RuntimeError, KeyError, TypeError, AssertionError) as exc:
            raise load_error(exc, model, self.spec, self.device) from None

    def capture_path(self) -> str:
        """Where decisions are taken: `device` (one host copy per step, CUDA graphs kept) or `host`.

        The device path computes every decision rule of samplers.py with device ops that give the
        same bits as numpy (float64), so both paths write identical traces; the host path stays for
        plugin `on_logits` hooks (they need host logits before the decision), `on_load` patches (a patch
        that reads Python state, e.g. the step, would be frozen into a CUDA graph) and MPS (no float64).
        """
        asked = (self.path_choice or os.environ.get(CAPTURE_PATH_ENV, "")).strip().lower() or "auto"
        if asked not in CAPTURE_PATHS:
            raise XBackendError(f"Unknown capture path {asked!r}",
                                asked=f"{CAPTURE_PATH_ENV} takes host, device or auto",
                                fix=f"unset {CAPTURE_PATH_ENV}, or set it to host or device")
        if self.on_logits is not None or self.on_load is not None or asked == "host" or self.host_decisions:
            return "host"
        if self.spec.name == "mps":
            if asked == "device":
                raise XBackendError(f"Backend {self.spec} cannot take decisions on the device",
                                    asked="the device path computes decisions in float64, which MPS lacks",
                                    fix=f"unset {CAPTURE_PATH_ENV} (MPS uses the host path)")
            return "host"
        return "device"

    def generate(self, job: Job, recorder: StepRecorder, on_step: Callable[[StepRecord], None]) -> None:
        if self.capture_path() == "host" or recorder.on_logits is not None:
            self._generate_host(job, recorder, on_step)
        else:
            self._generate_device(job, recorder, on_step)

    def _lmgen(self, job: Job):
        from moshi.models import lm as lm_module

        s = job.sampler.settings
        return lm_module.LMGen(self.lm, use_sampling=True, temp=s.temp_audio, temp_text=s.temp_text,
                               top_k=s.top_k_audio, top_k_text=s.top_k_text)

    def _generate_host(self, job: Job, recorder: StepRecorder, on_step: Callable[[StepRecord], None]) -> None:
        """Eager: every stream's logits go to the host, which decides (or checks the native pick)."""
        with contextlib.closing(self.steps(job, recorder)) as steps:
            for record in steps:
                on_step(record)

    def steps(self, job: Job, recorder: StepRecorder) -> Iterator[StepRecord]:
        """The host path one step per `next()`, CUDA graphs off.

        Upstream's `sample_token`, moshi's compile and graph switches and torch's grad mode are set
        only while a step runs, so that two backends of one process may step in turn (`locate`)."""
        import torch
        from moshi.models import lm as lm_module
        from moshi.utils.compile import no_compile, no_cuda_graph

        gen = self._lmgen(job)
        original = lm_module.sample_token

        def hook(logits, use_sampling=False, temp=1.0, top_k=0, top_p=0.0):
            flat = logits.reshape(-1, logits.shape[-1])
            host = recorder.take(flat[0].float().cpu().numpy())
            if recorder.native:
                if recorder.on_logits is not None:
                    logits = torch.from_numpy(host).to(device=logits.device, dtype=logits.dtype).view_as(logits)
                token = original(logits, use_sampling, temp, top_k, top_p)
                pick = token.reshape(-1)[:1]
                prob = _sampled_prob(torch, logits, pick, use_sampling, temp)
                recorder.native_token(int(pick[0]), None if prob is None else float(prob[0]))
                return token
            return torch.full(logits.shape[:-1], recorder.decide(), dtype=torch.long, device=logits.device)

        n_user = job.model.n_user
        self.seed_rng(job.seed)
        with gen.streaming(1):
            for t in range(job.steps):
                frame = job.frame(t, self.consumes_late)
                recorder.begin(t)
                lm_module.sample_token = hook
                try:
                    with no_cuda_graph(), (contextlib.nullcontext() if self.compile else no_compile()), \
                            torch.no_grad():
                        gen.step(torch.tensor(frame, dtype=torch.long, device=self.device).view(1, n_user, 1))
                finally:
                    lm_module.sample_token = original
                yield recorder.finish(frame)

    def upstream_model(self):
        return self.lm

    def layer_probe(self, entries):
        from .torch_probe import TorchProbe

        return TorchProbe(self.lm, entries)

    def _generate_device(self, job: Job, recorder: StepRecorder, on_step: Callable[[StepRecord], None]) -> None:
        """Decisions on the device, one host copy per step, upstream's CUDA graphs kept.

        Steps are pipelined by one: step t+1 is launched before the host checks and writes step t,
        so the host work overlaps the device's. Inputs of a step never depend on the host's view
        of the previous one (portable noise, forced tokens and user codes are all known upfront).
        """
        import torch
        from moshi.models import lm as lm_module
        from moshi.utils.compile import no_compile

        gen = self._lmgen(job)
        original = lm_module.sample_token
        dev = DeviceDecisions(job, torch.device(self.device), original)
        self.seed_rng(job.seed)
        lm_module.sample_token = dev.sample_token
        pending = None
        try:
            with (contextlib.nullcontext() if self.compile else no_compile()), gen.streaming(1), torch.no_grad():
                for t in range(job.steps):
                    frame = job.frame(t, self.consumes_late)
                    try:
                        gen.step(dev.begin(t, frame))
                        ticket = dev.download(t, frame)
                    except BaseException:
                        if pending is not None:  # keep the finished step: a killed run keeps steps up to N
                            dev.record(pending, recorder, on_step)
                        recorder.begin(t)
                        raise
                    if pending is not None:
                        dev.record(pending, recorder, on_step)
                    pending = ticket
                if pending is not None:
                    dev.record(pending, recorder, on_step)
        finally:
            lm_module.sample_token = original


class DeviceDecisions:
    """Static device buffers and the `sample_token` replacement of the device path.

    Per step the device writes every stream's float32 logits, the int64 tokens and the float64
    margins into one packed byte buffer, which travels to the host in one copy. Its addresses never
    change, so the calls inside upstream's CUDA-graphed depformer are captured once and replayed.
    Rules (samplers.py, all float64 where numpy is): portable z = logits/temp, keep z >= k-th largest,
    score = z + gumbel, argmax, margin = (score[tok] - max of the others) * temp; greedy argmax with
    margin logit[tok] - max of the others; forced the uploaded token (-1: greedy), same margin.
    """

    def __init__(self, job: Job, device, original: Callable):
        import torch

        self.torch, self.device, self.original = torch, device, original
        self.sampler, self.vocab = job.sampler, [int(v) for v in job.model.vocab]
        self.mode, self.n = job.sampler.mode, len(self.vocab)
        offsets = np.concatenate([[0], np.cumsum(self.vocab)]).astype(int)
        total = int(offsets[-1])
        logit_bytes = -(-4 * total // 8) * 8
        self.layout = (offsets, logit_bytes, logit_bytes + 8 * self.n, logit_bytes + 16 * self.n)
        packed = torch.empty(self.layout[3], dtype=torch.uint8, device=device)
        self.packed = packed
        self.logits = [packed[4 * offsets[k]:4 * offsets[k + 1]].view(torch.float32) for k in range(self.n)]
        self.margins = packed[logit_bytes:self.layout[2]].view(torch.float64)
        self.tokens = packed[self.layout[2]:].view(torch.int64)
        self.margins.fill_(math.nan)
        self.rules, self.temps = [], []
        for k, v in enumerate(self.vocab):
            temp, top_k = job.sampler.settings.for_stream(k)
            rule = self.mode
            if rule == "portable" and temp <= 0:
                rule = "greedy"
            self.rules.append(rule)
            self.temps.append((temp, torch.tensor(temp, dtype=torch.float64, device=device),
                               effective_top_k(top_k, v)))
        self.cuda = device.type == "cuda"
        pin = self.cuda
        self.host = [torch.empty(self.layout[3], dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        self.events = [torch.cuda.Event() if self.cuda else None for _ in range(2)]
        # Inputs uploaded before each step: user codes, portable noise, forced tokens.
        n_user = job.model.n_user
        self.frame = torch.zeros((1, n_user, 1), dtype=torch.long, device=device)
        self.frame_stage = [torch.zeros(n_user, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self.noise = self.noise_stage = self.forced = self.forced_stage = None
        if self.mode == "portable":
            self.noise = torch.zeros(total, dtype=torch.float64, device=device)
            self.noise_views = [self.noise[offsets[k]:offsets[k + 1]] for k in range(self.n)]
            self.noise_stage = [torch.zeros(total, dtype=torch.float64, pin_memory=pin) for _ in range(2)]
        if self.mode == "forced":
            self.forced = torch.full((self.n,), -1, dtype=torch.long, device=device)
            self.forced_stage = [torch.full((self.n,), -1, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self.stream = 0
        self.seed = job.sampler.seed

    # --- before a step: inputs into static buffers -------------------------------------------------

    def begin(self, step: int, frame: np.ndarray):
        """Upload step `step`'s inputs (stream-ordered, non-blocking); returns the frame tensor for LMGen."""
        slot = step % 2
        self.stream = 0
        stage = self.frame_stage[slot]
        stage.numpy()[:] = frame
        self.frame.view(-1).copy_(stage, non_blocking=True)
        if self.noise is not None:
            host = self.noise_stage[slot].numpy()
            offsets = self.layout[0]
            for k, v in enumerate(self.vocab):
                if self.rules[k] == "portable":
                    host[offsets[k]:offsets[k + 1]] = -np.log(-np.log(portable_uniforms(self.seed, step, k, v)))
            self.noise.copy_(self.noise_stage[slot], non_blocking=True)
        if self.forced is not None:
            host = self.forced_stage[slot].numpy()
            for k, v in enumerate(self.vocab):
                token = self.sampler.forced_token(step, k)
                if token >= v:
                    raise BackendFailed(f"Forced token {token} at step {step}, stream {k} is outside the "
                                        f"vocabulary of {v}", fix="force with tokens of the same model")
                host[k] = token
            self.forced.copy_(self.forced_stage[slot], non_blocking=True)
        return self.frame

    # --- during a step: upstream calls this instead of sample_token ---------------------------------

    def sample_token(self, logits, use_sampling=False, temp=1.0, top_k=0, top_p=0.0):
        torch = self.torch
        k = self.stream
        if k >= self.n:
            raise BackendFailed(f"Backend sampled more than {self.n} streams in one step")
        self.stream += 1
        x = logits.reshape(-1, logits.shape[-1])[0]
        self.logits[k].copy_(x)
        if self.mode == "native":
            token = self.original(logits, use_sampling, temp, top_k, top_p)
            pick = token.reshape(-1)[:1]
            self.tokens[k:k + 1].copy_(pick)
            prob = _sampled_prob(torch, logits, pick, use_sampling, temp)
            if prob is not None:  # the float32 probability upstream drew from, for the zero check
                self.margins[k:k + 1].copy_(prob)
            return token
        rule = self.rules[k]
        if rule == "portable":
            t, t_dev, kk = self.temps[k]
            z = x.double().div_(t_dev)  # a device scalar: CUDA divides by a CPU scalar as a * (1/b)
            kth = torch.kthvalue(z, z.shape[0] - kk + 1).values
            score = torch.where(z >= kth, z + self.noise_views[k], -math.inf)
            token = score.argmax().view(1)
            self.margins[k:k + 1].copy_(_gap(torch, score, token).mul_(t))
        else:
            z = x.double()
            token = x.argmax().view(1)
            if rule == "forced":
                forced = self.forced[k:k + 1]
                token = torch.where(forced >= 0, forced, token)
            self.margins[k:k + 1].copy_(_gap(torch, z, token))
        self.tokens[k:k + 1].copy_(token)
        return token.view(logits.shape[:-1])

    # --- after a step: one copy to the host, then the recorder's checks ----------------------------

    def download(self, step: int, frame: np.ndarray) -> tuple:
        """Start the one device-to-host copy of step `step`; the result is read by `record`."""
        # A replayed CUDA graph runs the depformer's decisions without calling Python: only the
        # text decision (outside the graphs) is seen then.
        if self.stream != self.n and not (self.cuda and self.stream == 1):
            raise BackendFailed(f"Backend decided {self.stream} of {self.n} streams at step {step}")
        slot = step % 2
        if not self.cuda:
            return step, frame, self.packed.cpu().numpy().copy()
        self.host[slot].copy_(self.packed, non_blocking=True)
        self.events[slot].record()
        return step, frame, slot

    def record(self, ticket: tuple, recorder: StepRecorder, on_step: Callable[[StepRecord], None]) -> None:
        """Hand a finished step to the recorder (NaN/Inf and zero-probability checks), in stream order."""
        step, frame, data = ticket
        if self.cuda:
            self.events[data].synchronize()
            data = self.host[data].numpy().copy()
        offsets, logit_bytes, token_at, _ = self.layout
        floats = data[:4 * offsets[-1]].view(np.float32)
        margins = data[logit_bytes:token_at].view(np.float64)
        tokens = data[token_at:].view(np.int64)
        recorder.begin(step)
        for k in range(self.n):
            recorder.take(floats[offsets[k]:offsets[k + 1]])
            if self.mode == "native":
                prob = float(margins[k])
                recorder.native_token(int(tokens[k]), None if math.isnan(prob) else prob)
            else:
                recorder.decided(int(tokens[k]), float(margins[k]))
        on_step(recorder.finish(frame))


def _gap(torch, scores, token):
    """scores[token] minus the best other score (samplers.top_two_gap, by index), float64 [1]."""
    if scores.shape[-1] < 2:
        return torch.full((1,), math.inf, dtype=torch.float64, device=scores.device)
    others = scores.scatter(0, token, -math.inf)
    return scores.gather(0, token) - others.max().view(1)


def _sampled_prob(torch, logits, pick, use_sampling: bool, temp: float):
    """Probability of the picked token in the distribution `sample_token` drew from, on the device.

    The same op on the same tensor as upstream (`softmax(logits.float() / temp)`), so the same
    bits, with the device's own underflow and flush-to-zero; None for a greedy decision.
    """
    if not use_sampling or temp <= 0:
        return None
    probs = torch.softmax(logits.float() / temp, dim=-1)
    return probs.reshape(-1, probs.shape[-1])[0].gather(0, pick)


def load_error(exc: Exception, model: ModelRef, spec: BackendSpec, device: str) -> XBackendError:
    """A checkpoint that does not fit its config is bad input (exit 2); anything else the device
    said while loading (out of memory, a dtype it lacks) is the backend failing (exit 3)."""
    import torch

    detail = _first_line(exc, lines=3)
    oom = isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in str(exc).lower()
    fits = isinstance(exc, (KeyError, AssertionError)) or any(w in str(exc) for w in STATE_DICT_WORDS)
    if fits and not oom:
        return XBackendError(f"Checkpoint {model.weights} does not fit its config ({detail})",
                             asked=f"model {model.name}, layout {model.layout}",
                             fix="pass the config.json that belongs to these weights")
    error = BackendUnavailable if isinstance(exc, TypeError) else BackendFailed
    return error(f"Backend {spec} failed to load model {model.name} onto {device} ({detail})",
                 fix="free device memory or use a smaller dtype" if oom else
                 "run `xbackend backends` to see what this device supports")


def torch_compile_wanted(choice: str) -> bool:
    """`--compile` for moshi. moshi as it ships wraps rms-norm, rope and gating in a lazy `torch.compile`
    unless NO_TORCH_COMPILE is set when it is imported (moshi/utils/compile.py, `torch_compile_lazy`),
    and its transformer layers enter `no_compile()` off CUDA, so on the CPU and MPS only the output
    RMSNorm compiles. `auto` is exactly that; `off` runs eagerly (`no_compile()`); `on` is `auto` that
    refuses to run where NO_TORCH_COMPILE leaves nothing to compile."""
    from ..store.validate import compile_choice

    compile_choice(choice)  # `on` where NO_TORCH_COMPILE is set: one clear error
    blocked = bool(os.environ.get("NO_TORCH_COMPILE"))  # moshi's own test: any non-empty value
    return choice != "off" and not blocked


def compiled_by_moshi() -> list[str]:
    """moshi's lazily compiled functions that torch.compile really took in this process.

    moshi compiles lazily, and only outside `no_compile()`, which its transformer layers enter
    off CUDA: on MPS or the CPU most of the model runs eager even when compilation is on.
    """
    import importlib

    done = []
    for module, name in LAZY_COMPILED:
        fn = getattr(importlib.import_module(module), name, None)
        code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
        if code is None or not cells or "fun_compiled" not in code.co_freevars:
            continue  # NO_TORCH_COMPILE at import: moshi left the function plain
        if cells[code.co_freevars.index("fun_compiled")].cell_contents is not None:
            done.append(name)
    return done


def _first_line(exc: Exception, lines: int = 1) -> str:
    text = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
    return " ".join(text[:lines])[:400]


def _cuda_graphs_allowed() -> bool:
    """Upstream's own switch (moshi.utils.compile): NO_CUDA_GRAPH set to anything but 0/no/n turns them off."""
    return os.environ.get("NO_CUDA_GRAPH", "").lower() in ("0", "no", "n", "")

