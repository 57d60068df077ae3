"""The codec stage's report: `report.md`, waveform/spectrogram difference plots and a bundle.

Read back from what `xbackend codec` wrote (`report.json` and the arrays under `codecs/`); nothing
is run. `xbackend report DIR` lands here when `report.json` has the codec schema. Arrays are
found by name inside the run directory (never by a path read from report.json), so a tampered
report cannot point the report at other files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .stage import FILES, MISMATCH_FACTOR, PATHS, SCHEMA, frame_errors
from .base import SAMPLE_RATE
from ..store.rundir import safe_name
from ..errors import XBackendError
from ..store.files import write_file, write_text

REPORT_MD = "report.md"
BUNDLE = "bundle.tar.gz"
PLOTS = "plots"
BUNDLE_ROOT = "xbackend-codec-bundle"
FLOOR = 1e-12  # zeros (bitwise-equal frames) are drawn here on log scales


@dataclass(frozen=True)
class CodecReportFiles:
    markdown: Path
    plots: tuple[Path, ...]
    bundle: Path
    bundle_bytes: int


def _read(run_dir: Path) -> dict | None:
    from ..store.files import load_json

    file = run_dir / "report.json"
    if not file.is_file() and not file.is_symlink():
        return None
    return load_json(file, "report.json", "run `xbackend codec --out DIR` again")


def is_codec_run(run_dir: str | Path) -> bool:
    """True when `run_dir/report.json` was written by `xbackend codec`."""
    try:
        data = _read(Path(run_dir))
    except XBackendError:
        return False  # `report` then reads it as a compare run, and says what is wrong with it
    return isinstance(data, dict) and data.get("schema") == SCHEMA


def load_codec_run(run_dir: str | Path) -> dict:
    """report.json of a codec run, its fields checked."""
    run_dir = Path(run_dir)
    data = _read(run_dir)
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise XBackendError(f"{run_dir / 'report.json'} is not a codec report (schema {SCHEMA})",
                            fix="run `xbackend codec --out DIR` first")
    ok = (isinstance(data.get("codecs"), list) and isinstance(data.get("verdicts"), list)
          and isinstance(data.get("reference"), str)
          and all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in data["codecs"]))
    if not ok:
        raise XBackendError(f"{run_dir / 'report.json'} lacks the codec report's fields (codecs, verdicts, reference)",
                            fix="run `xbackend codec` again")
    return data


def array(run_dir: Path, label: str, key: str) -> np.ndarray | None:
    """One codec's array by name, refusing symlinks and anything outside the run directory."""
    path = run_dir / "codecs" / safe_name(label) / FILES[key]
    if path.is_symlink() or not path.is_file():
        return None
    if run_dir.resolve() not in path.resolve().parents:
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- plots


def plot_codec(run_dir: Path, report: dict, verdict: dict, path: Path) -> Path | None:
    """Waveforms, per-frame error against the tolerance, the difference's spectrogram, and which codes differ."""
    ref_label, label = report["reference"], verdict["codec"]
    ref, other = array(run_dir, ref_label, "decode"), array(run_dir, label, "decode")
    if ref is None or other is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tol = float(verdict["figures"]["tolerance"]["audio"])
    at = verdict.get("first_divergence") or {}
    fig, axes = plt.subplots(4, 1, figsize=(10, 11), constrained_layout=True)
    t = np.arange(ref.shape[0]) / SAMPLE_RATE
    ax = axes[0]
    ax.plot(t, ref, color="black", linewidth=0.8, label=f"{ref_label} (reference)")
    ax.plot(t, other, color="tab:orange", linewidth=0.6, alpha=0.8, label=label)
    ax.set_ylabel("decoded audio")
    ax.set_title(f"{label} against {ref_label}: decoding the same codes ({verdict['verdict']})", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax = axes[1]
    for key, color, name in (("decode", "tab:blue", "one call"), ("decode_steps", "tab:green", "frame by frame")):
        a, b = array(run_dir, ref_label, key), array(run_dir, label, key)
        if a is not None and b is not None:
            err = frame_errors(a, b)
            ax.step(np.arange(err.shape[0]), np.maximum(err, FLOOR), where="post", color=color, label=name)
    ax.axhline(tol, color="gray", linestyle="--", linewidth=1.0, label=f"tolerance {tol:g}")
    ax.axhline(tol * MISMATCH_FACTOR, color="gray", linestyle=":", linewidth=1.0, label=f"mismatch {tol * MISMATCH_FACTOR:g}")
    if at.get("frame") is not None:
        ax.axvline(at["frame"], color="red", linestyle="--", linewidth=1.0, label=f"first divergence, frame {at['frame']}")
    ax.set_yscale("log")
    ax.set_xlabel("frame (80 ms)")
    ax.set_ylabel(f"max |Δ| / reference RMS\n(zeros at {FLOOR:g})")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax = axes[2]
    delta = other.astype(np.float64) - ref.astype(np.float64)
    ref_peak = np.abs(ref).max() or 1.0
    _, _, _, image = ax.specgram(delta + 1e-30, NFFT=512, Fs=SAMPLE_RATE, noverlap=256, cmap="magma",
                                 vmin=20 * np.log10(ref_peak) - 160, vmax=20 * np.log10(ref_peak))
    fig.colorbar(image, ax=ax, label="dB")
    ax.set_ylabel("difference: Hz")
    ax = axes[3]
    ca, cb = array(run_dir, ref_label, "encode"), array(run_dir, label, "encode")
    if ca is not None and cb is not None and ca.shape == cb.shape:
        ax.imshow((ca != cb).astype(float), aspect="auto", interpolation="nearest", cmap="Reds", vmin=0, vmax=1)
        ax.set_ylabel("codebook")
        ax.set_xlabel("frame: red = code differs (one-call encode)")
    else:
        ax.set_axis_off()
    from ..report import save_figure

    save_figure(fig, path)
    return path


# --------------------------------------------------------------------------- markdown


def _table(header: list[str], rows: list[list]) -> str:
    from tabulate import tabulate

    return tabulate(rows, headers=header, tablefmt="github", disable_numparse=True)


def _num(x, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def _snr(x) -> str:
    return "∞" if x is None else f"{x:.1f}"


def _where(at: dict | None) -> str:
    if not at:
        return "-"
    cb = f", codebook {at['codebook']}" if at.get("codebook") is not None else ""
    return f"frame {at['frame']}{cb} ({at.get('path')}, {at.get('what')})"


def summary_rows(report: dict) -> list[list]:
    rows = []
    for v in report["verdicts"]:
        f = v["figures"]
        codes = f.get("codes", {})
        audio = f.get("audio", {})
        rows.append([v["codec"], v["vs"], v["verdict"], _where(v.get("first_divergence")),
                     " / ".join(f"{1 - codes[p]['disagreement']:.1%}" if p in codes else "-" for p in PATHS),
                     " / ".join(_num(audio[p]["max_abs"]) if p in audio else "-" for p in PATHS),
                     " / ".join(_snr(audio[p]["snr_db"]) if p in audio else "-" for p in PATHS),
                     "yes" if f.get("within_tolerance") else "no"])
    return rows


SUMMARY_HEADER = ["codec", "vs", "verdict", "first divergence", "codes agree (one call / frames)",
                  "decode max |Δ|", "decode SNR dB", "within tolerance"]


def summary_lines(report: dict) -> list[str]:
    """Plain-text table for the terminal."""
    from tabulate import tabulate

    lines = tabulate(summary_rows(report), headers=SUMMARY_HEADER, tablefmt="simple", disable_numparse=True).splitlines()
    lines += [f"{v['codec']} ({v['verdict']}): {v['explanation']}" for v in report["verdicts"]]
    for label, t in report.get("timing", {}).get("codecs", {}).items():
        per = ", ".join(f"{k} {v['seconds_per_audio_second']:.2f}" for k, v in t.items() if isinstance(v, dict))
        lines.append(f"{label}: seconds per second of audio: {per}")
    return lines


def render_markdown(report: dict, plots: dict[str, Path], run_dir: Path) -> str:
    req = report.get("request", {})
    prompt = req.get("prompt", {})
    out = [f"# xbackend codec stage: {', '.join(req.get('codecs', []))}", "",
           f"Reference **{report['reference']}**; Mimi weights `{report.get('weights', {}).get('weights')}` "
           f"(digest `{report.get('weights', {}).get('digest')}`), {req.get('codebooks')} codebooks; prompt "
           f"`{prompt.get('source')}` ({prompt.get('seconds')} s, {prompt.get('frames')} frames of 80 ms); "
           f"run {report.get('created')}.", "", "## Verdicts", "",
           _table(SUMMARY_HEADER, summary_rows(report)), ""]
    for c in report["codecs"]:
        if c.get("status") != "ok":
            out.append(f"- **{c['name']}: {c.get('status')}** - {c.get('error')}")
    out += [f"- **{v['codec']}** ({v['verdict']}): {v.get('explanation', '')}" for v in report["verdicts"]]
    out += [f"- not diagnosed: {d['codec']} ({d['reason']})" for d in report.get("not_diagnosed", [])]
    out += ["", "## Codes per codebook", ""]
    for v in report["verdicts"]:
        for path, c in v["figures"].get("codes", {}).items():
            rows = [[cb["codebook"], f"{cb['agreement']:.1%}", _num(cb["first_frame"], "d")] for cb in c["codebooks"]]
            out += [f"**{v['codec']}**, {path} encode against {v['vs']}:", "",
                    _table(["codebook", "agreement", "first differing frame"], rows), ""]
    out += ["## Decoded audio", "",
            "Each codec decodes the reference's one-call codes, in one call and frame by frame; errors are per 80 ms "
            "frame, max |Δ| over the reference's RMS.", ""]
    rows = []
    for v in report["verdicts"]:
        for path, a in v["figures"].get("audio", {}).items():
            rows.append([v["codec"], path, _num(a["max_abs"]), _num(a["max_rel"]), _snr(a["snr_db"]),
                         _num(a["first_frame_above_tolerance"], "d"), a["frames_above_tolerance"], f"{a['tolerance']:g}"])
    out += [_table(["codec", "path", "max |Δ|", "worst frame / RMS", "SNR dB", "first frame above tolerance",
                    "frames above", "tolerance"], rows), ""]
    for label, path in plots.items():
        out += [f"![{label}]({path.relative_to(run_dir).as_posix()})", ""]
    out += ["## Each codec on its own", "",
            "Round trip: the codec decodes its own codes; SNR against the input. Frame by frame against one call: "
            "the same codec's streaming encode/decode against its one-call results.", ""]
    cons = {c["codec"]: c for c in report.get("streaming_consistency", [])}
    timing = report.get("timing", {}).get("codecs", {})
    rows = []
    for c in report["codecs"]:
        s = cons.get(c["name"])
        t = timing.get(c["name"], {})
        per = lambda k: _num((t.get(k) or {}).get("seconds_per_audio_second"))  # noqa: E731
        rows.append([c["name"], c.get("status"), _snr(c.get("roundtrip_snr_db")) if c.get("status") == "ok" else "-",
                     "-" if s is None else ("identical" if s["codes"]["identical"] else f"{1 - s['codes']['disagreement']:.1%} agree"),
                     "-" if s is None else f"{_num(s['audio']['max_abs'])} (SNR {_snr(s['audio']['snr_db'])})",
                     per("encode"), per("encode_steps"), per("decode"), per("decode_steps")])
    out += [_table(["codec", "status", "round-trip SNR dB", "frames vs one call: codes", "audio max |Δ|",
                    "encode s/s", "encode frames s/s", "decode s/s", "decode frames s/s"], rows), "",
            "(s/s: seconds of compute per second of audio on this machine.)", ""]
    out += ["## Reproduce", "", "```sh", report.get("command") or "", "```", ""]
    env_rows = []
    for c in report["codecs"]:
        e = c.get("env") or {}
        versions = e.get("versions") or {}
        env_rows.append([c["name"], e.get("os"), e.get("machine"), e.get("python"), e.get("library"),
                         e.get("device"), e.get("dtype"), e.get("threads", "-"),
                         ", ".join(f"{k} {v}" for k, v in versions.items() if v)])
    out += ["## Environment", "", "<details>\n<summary>env fingerprint of every codec</summary>", "",
            _table(["codec", "os", "machine", "python", "library", "device", "dtype", "threads", "versions"], env_rows),
            "", "</details>", ""]
    return "\n".join(out)


def write_codec_report(run_dir: str | Path) -> CodecReportFiles:
    """Write report.md, one difference plot per compared codec and bundle.tar.gz into a codec run directory."""
    from ..store.claim import claim

    run_dir = Path(run_dir)
    report = load_codec_run(run_dir)
    from ..store.files import shaped

    with claim(run_dir, "codec", what="codec run directory"), \
            shaped(f"{run_dir / 'report.json'} (or an array it names)", "run `xbackend codec --out DIR` again"):
        return _write(run_dir, report)


def _write(run_dir: Path, report: dict) -> CodecReportFiles:
    from ..report import add_file, tar_bytes

    plots = {}
    for v in report["verdicts"]:
        if v["codec"] == report["reference"]:
            continue
        made = plot_codec(run_dir, report, v, run_dir / PLOTS / f"codec-{safe_name(v['codec'])}.png")
        if made is not None:
            plots[v["codec"]] = made
    md = run_dir / REPORT_MD
    write_text(md, render_markdown(report, plots, run_dir))
    files = [run_dir / "report.json", md, *plots.values()]
    for c in report["codecs"]:
        for key in ("encode", "encode_steps"):
            p = run_dir / "codecs" / safe_name(c["name"]) / FILES[key]
            if p.is_file() and not p.is_symlink():
                files.append(p)
    readme = ("xbackend codec-stage bundle: report.json, report.md, difference plots and every codec's codes "
              "(codecs/<codec>/codes.npy one call, codes_stream.npy frame by frame; numpy .npy, [codebooks, frames]).\n")
    bundle = run_dir / BUNDLE
    data = tar_bytes(lambda tar: [add_file(tar, run_dir, f, BUNDLE_ROOT) for f in files], readme, BUNDLE_ROOT)
    write_file(bundle, data)
    return CodecReportFiles(md, tuple(plots.values()), bundle, len(data))
