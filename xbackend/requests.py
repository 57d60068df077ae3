"""Typed requests: what a `capture` or a `compare` is asked to do, and the exact command line that asks it again.

`to_argv()` is the one place that turns a request into `xbackend ...` arguments: report.md's Reproduce line is
`CompareRequest.to_argv()`, so every field the command reads is written (tests/test_requests.py parses the argv
back with the real CLI and gets the same request).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .samplers import DEFAULT_SEED, SamplingSettings

DEFAULT_ARBITER = "cpu:fp64"
ARBITER_AUTO, ARBITER_NONE = "auto", "none"

# (SamplingSettings field, its CLI flag), in the order the commands list them
SETTING_FLAGS = (("temp_text", "--temp-text"), ("top_k_text", "--top-k-text"),
                 ("temp_audio", "--temp-audio"), ("top_k_audio", "--top-k-audio"))


def _common_argv(req) -> list[str]:
    """The flags `capture` and `compare` share, every one written (a default may change between versions)."""
    args = ["--model", req.model]
    if req.model_config is not None:
        args += ["--model-config", req.model_config]
    if req.prompt is not None:
        args += ["--prompt", req.prompt]
    if req.prompt_frames is not None:
        args += ["--prompt-frames", str(req.prompt_frames)]
    args += ["--seed", str(req.seed), "--steps", str(req.steps), "--compile", req.compile]
    for key, flag in SETTING_FLAGS:
        args += [flag, repr(getattr(req.settings, key))]
    return args


@dataclass(frozen=True)
class CaptureRequest:
    """Everything that defines a run; two traces are comparable when these agree."""

    backend: str
    model: str = "tiny"
    model_config: str | None = None
    prompt: str | None = None
    seed: int = DEFAULT_SEED
    steps: int = 50
    sampler: str = "native"
    alignment: str = "aligned"
    settings: SamplingSettings = field(default_factory=SamplingSettings)
    run_index: int = 0  # which of a backend's runs this is; set by `compare`, no flag of `capture`
    prompt_frames: int | None = None  # a codes prompt's own frames; those past it are an audio prompt's fill
    compile: str = "auto"  # auto | on | off (env.COMPILE_CHOICES); recorded in `effective`

    def to_argv(self) -> list[str]:
        """`xbackend capture ...` for this request (no `--out`: where to write is the caller's)."""
        return ["xbackend", "capture", "--backend", self.backend, *_common_argv(self),
                "--sampler", self.sampler, "--alignment", self.alignment]


@dataclass(frozen=True)
class CompareRequest:
    backends: tuple[str, ...]
    model: str = "tiny"
    model_config: str | None = None
    prompt: str | None = None
    seed: int = DEFAULT_SEED
    steps: int = 100
    repeats: int = 2
    timeout: float = 600.0
    alignment: str = "aligned"
    settings: SamplingSettings = field(default_factory=SamplingSettings)
    plugins: tuple[str, ...] = ()
    decode_audio: bool = True  # no flag: the `compare` command always decodes (check's baselines do not)
    codec: str = "torch:cpu"  # the codec spec that decodes each backend's audio tokens
    arbiter: str = ARBITER_AUTO  # auto: cpu:fp64 when the model fits in memory; none: off; or a spec
    sampler: str | None = None  # compare: the comparable free runs' (portable | candle); repeat: the runs' (native)
    prompt_frames: int | None = None  # a codes prompt's own frames (see CaptureRequest)
    compile: str = "auto"  # every run's --compile (auto | on | off), the arbiter's too

    def to_argv(self) -> list[str]:
        """`xbackend compare ...` for this request: every field the command has a flag for (no `--out`)."""
        args = ["xbackend", "compare", "--backends", ",".join(self.backends), *_common_argv(self),
                "--repeats", str(self.repeats), "--timeout", repr(float(self.timeout)), "--alignment", self.alignment,
                "--sampler", self.sampler or "portable", "--arbiter", self.arbiter, "--codec", self.codec]
        for plugin in self.plugins:
            args += ["--plugin", plugin]
        return args

    def to_record(self, model: str, model_digest: str | None, prompt: dict) -> dict:
        """report.json's `request`: the model and prompt as resolved (a name and digest, a description)."""
        return {"backends": list(self.backends), "model": model, "model_config": self.model_config,
                "model_digest": model_digest, "prompt": prompt, "seed": self.seed, "steps": self.steps,
                "repeats": self.repeats, "timeout": self.timeout, "alignment": self.alignment,
                "sampler": self.sampler or "portable", "settings": self.settings.to_dict(),
                "plugins": list(self.plugins), "arbiter": self.arbiter, "compile": self.compile}

    @classmethod
    def from_record(cls, data: dict, *, prompt: str | None = None, codec: str | None = None) -> CompareRequest:
        """The request report.json recorded (`CompareReport.request`). Its prompt is a description, not a path:
        the caller names the file that holds it (`prompt`); the codec is recorded beside it (`report.codec`)."""
        defaults = cls(backends=())
        frames = data.get("prompt", {}).get("frames") if isinstance(data.get("prompt"), dict) else None
        fed = data.get("prompt", {}).get("fed_frames") if isinstance(data.get("prompt"), dict) else None
        return cls(backends=tuple(data["backends"]), model=data["model"], model_config=data.get("model_config"),
                   prompt=prompt, seed=data["seed"], steps=data["steps"], repeats=data["repeats"],
                   timeout=data.get("timeout", defaults.timeout), alignment=data["alignment"],
                   settings=SamplingSettings.from_dict(data.get("settings")),
                   plugins=tuple(data.get("plugins") or ()), codec=codec or defaults.codec,
                   arbiter=data.get("arbiter") or defaults.arbiter, sampler=data.get("sampler") or "portable",
                   # a report without --compile predates it: xbackend then ran eagerly (as check reads baselines)
                   compile=data.get("compile") or "off",
                   # frames fewer than those fed: the rest is an audio prompt's silence fill
                   prompt_frames=frames if prompt is not None and isinstance(frames, int) and isinstance(fed, int)
                   and frames < fed else None)
