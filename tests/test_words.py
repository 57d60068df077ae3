"""Words: the bundled tokenizer, trace_text(), where a tokenizer is looked for, and the divergence mark."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from xbackend.capture.models import TINY, file_digest, resolve_model
from xbackend.store.trace import TraceWriter, load_trace
from xbackend.analysis.words import (MARK, first_difference, join, pieces, run_words, shorten, tokenizer_for,
                                     trace_text)

from .helpers import ROOT, have, needs_tiny, run_cli

pytestmark = pytest.mark.skipif(not have("sentencepiece"), reason="sentencepiece not installed")
BUNDLED = TINY / "tokenizer.model"


def sp():
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(BUNDLED))


def write(path, text_tokens, tokenizer: dict | None = "bundled", pad: int = 3):
    """A two-stream trace whose text stream is `text_tokens`, its model naming `tokenizer`."""
    model = {"name": "mine", "source": "local", "digest": "0" * 16, "config": {"existing_text_padding_id": pad}}
    if tokenizer == "bundled":
        tokenizer = {"name": BUNDLED.name, "path": str(BUNDLED), "digest": file_digest(BUNDLED)}
    if tokenizer is not None:
        model["tokenizer"] = tokenizer
    w = TraceWriter(path, {"model": model}, ["text", "audio0"], [320, 4], n_inputs=0)
    for t in text_tokens:
        w.write_step([np.zeros(320, np.float32), np.zeros(4, np.float32)], [t, 1], [0.0, 0.0], np.zeros(0))
    w.close()
    return load_trace(path)


def test_bundled_tokenizer_covers_the_tiny_text_vocabulary():
    config = json.loads((TINY / "config.json").read_text())
    p = sp()
    assert p.get_piece_size() == config["text_card"] == 320
    assert [p.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]  # Kyutai's special ids
    assert p.decode(p.encode("Alice was beginning to get very tired.")) == "Alice was beginning to get very tired."


def test_tokenizer_script_is_deterministic(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "tok.model"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tokenizer.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == BUNDLED.read_bytes()


def test_text_skips_padding_and_end_of_padding_as_upstream(tmp_path):
    p = sp()
    ids = p.encode("the age of wisdom")
    tokens = [0, ids[0], 3, 3, *ids[1:], 3, 0]
    trace = write(tmp_path / "t", tokens)
    expected = "".join(p.id_to_piece(i).replace("\u2581", " ") for i in ids).strip()
    assert trace_text(trace) == expected == "the age of wisdom"
    # the padding id comes from the model's config
    assert "<pad>" in trace_text(write(tmp_path / "p7", [3, *ids], pad=7))


def test_no_tokenizer_gives_empty_text(tmp_path):
    assert trace_text(write(tmp_path / "none", [5, 6, 7], tokenizer=None)) == ""
    # a tokenizer whose file changed since the run (or a trace from elsewhere): no words, not wrong ones
    moved = {"name": "tok.model", "path": str(tmp_path / "missing.model"), "digest": "f" * 16}
    assert trace_text(write(tmp_path / "moved", [5, 6, 7], tokenizer=moved)) == ""
    # hostile fields: not a file, a device, not strings
    for bad in ({"path": str(tmp_path), "digest": "x"}, {"path": "/dev/zero", "digest": "x"},
                {"path": 5, "digest": ["x"]}, "not a dict"):
        assert trace_text(write(tmp_path / f"bad{abs(hash(str(bad)))}", [5], tokenizer=bad)) == ""
    # an explicit tokenizer file is taken as given
    assert trace_text(write(tmp_path / "explicit", [11], tokenizer=None), BUNDLED) == "the"


def test_a_copied_tokenizer_with_the_same_digest_is_found(tmp_path):
    copy = tmp_path / "elsewhere.model"
    shutil.copy(BUNDLED, copy)
    trace = write(tmp_path / "t", [11], tokenizer={"name": "x", "path": str(copy), "digest": file_digest(BUNDLED)})
    assert trace_text(trace) == "the"
    copy.unlink()  # gone: the bundled file has that digest, so it still decodes
    assert trace_text(trace) == "the"


def test_mark_sits_at_the_first_differing_step(tmp_path):
    p = sp()
    same = p.encode("it was the best of times")
    a = write(tmp_path / "a", same + p.encode(" it was the worst"))
    b = write(tmp_path / "b", same + p.encode(" we had everything"))
    step, stream = first_difference(a, b)
    assert (step, stream) == (len(same), "text")
    assert join(pieces(b), step) == f"it was the best of times {MARK}we had everything"
    words = run_words({"ref": {"native-0": a, "portable": None}, "other": {"native-0": b}}, "ref")
    rows = {(r["backend"], r["run"]): r for r in words["runs"]}
    assert rows[("ref", "native-0")]["against"] is None and MARK not in rows[("ref", "native-0")]["marked"]
    assert rows[("other", "native-0")]["first_divergence"] == {"step": len(same), "stream": "text"}
    assert rows[("other", "native-0")]["marked"].endswith(f"{MARK}we had everything")
    assert words["tokenizer"]["digest"] == file_digest(BUNDLED) and words["skipped_ids"] == [0, 3]
    long = "x" * 200 + " " + MARK + "tail"
    assert len(shorten(long)) <= 110 and MARK + "tail" in shorten(long)


def test_local_checkpoint_finds_its_tokenizer_and_follows_no_path_out(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    shutil.copy(TINY / "model.safetensors", d / "model.safetensors")
    config = json.loads((TINY / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(config, tokenizer_name="spm.model")))
    assert resolve_model(str(d)).tokenizer is None
    shutil.copy(BUNDLED, d / "spm.model")
    assert resolve_model(str(d)).tokenizer == d / "spm.model"
    shutil.copy(BUNDLED, tmp_path / "outside.model")
    (d / "config.json").write_text(json.dumps(dict(config, tokenizer_name="../outside.model")))
    assert resolve_model(str(d)).tokenizer is None
    shutil.copy(BUNDLED, d / "tokenizer_spm_32k_3.model")  # upstream's name, found without a config entry
    assert resolve_model(str(d)).tokenizer == d / "tokenizer_spm_32k_3.model"
    assert resolve_model("tiny").tokenizer == BUNDLED
    assert resolve_model("tiny").describe()["tokenizer"]["digest"] == file_digest(BUNDLED)
    assert tokenizer_for({"model": resolve_model("tiny").describe()}).size == 320


@needs_tiny
def test_repeat_and_compare_print_words(tmp_path):
    proc = run_cli("repeat", "--backend", "cpu", "--runs", "2", "--steps", "30", "--out", str(tmp_path / "rep"))
    assert proc.returncode == 0, proc.stderr
    assert "2/2 runs give the same words as run 0, 2/2 the same decoded audio" in proc.stdout
    result = json.loads((tmp_path / "rep" / "repeat.json").read_text())
    texts = [w["text"] for w in result["words"]]
    assert texts[0] and texts[0] == texts[1] == trace_text(load_trace(tmp_path / "rep" / "traces" / "run-0"))
    assert result["words"][0]["audio_digest"] == result["words"][1]["audio_digest"] is not None
    assert all(f"{texts[0][:20]}" in line for line in proc.stdout.splitlines() if line.startswith("  run "))
