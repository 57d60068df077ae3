"""A run: model references and checkpoints (`models`), prompts, the capture loop (`run`), the worker process.

Kept empty on purpose: `backends` and `codecs` import `capture.models`, and an import of it runs this file."""
