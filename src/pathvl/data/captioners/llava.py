"""The ``llava`` captioner: a local LLaVA-family model asked MR-PLIP's question about each patch, generated
by Hugging Face ``transformers`` (``backend="hf"``, the CPU and test path) or by vLLM's offline engine
(``backend="vllm"``, GPUs at scale; :mod:`pathvl.data.captioners.vllm_backend`)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pathvl.data.captioners.base import Captioner, _mag_text, _sha256, register_captioner
from pathvl.data.captioners.vllm_backend import VLLM_BATCH_SIZE, VllmEngine
from pathvl.errors import UserError

#: MR-PLIP's question to the vision-language model; ``{mag}`` becomes the patch magnification ("20").
DEFAULT_QUESTION = "Describe the histopathological features of this image patch at {mag}x magnification."

#: Prompt used when the processor has no chat template: LLaVA-1.5's conversation format, which
#: Quilt-LLaVA inherits. ``{question}`` is replaced by the question, ``<image>`` by the image tokens.
LLAVA_PROMPT = "USER: <image>\n{question} ASSISTANT:"

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

#: Generation backends of the ``llava`` captioner, with their default batch sizes (patches per call).
BACKENDS = {"hf": 8, "vllm": VLLM_BATCH_SIZE}


class UnknownBackendError(UserError, ValueError):
    """A ``backend`` that is not one of :data:`BACKENDS`; the message names the choices."""


def _weights_sha256(folder: Path) -> str:
    """sha256 over the model's weight files (name and content digest of each, sorted by name)."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES):
        h.update(f.name.encode("utf-8") + b"\0" + _sha256(f).encode("ascii") + b"\n")
    return h.hexdigest()


@register_captioner("llava")
class LlavaCaptioner(Captioner):
    """A local LLaVA-family model (``LlavaForConditionalGeneration``) asked a question about each patch.

    MR-PLIP (Albastaki et al., 2025) captioned every patch at every magnification with Quilt-LLaVA
    (Seyfioglu et al., 2024); this runs any LLaVA checkpoint in the Hugging Face format from a local
    folder (nothing is downloaded), batched, greedy, in bf16 on a GPU when one is present.

    Both backends get the same prompt (:meth:`_prompt`) and the same RGB image per patch and their output is
    stripped the same way; only the generation call differs: ``"hf"`` runs ``model.generate`` on
    left-padded batches, ``"vllm"`` hands the batch to :class:`~pathvl.data.captioners.vllm_backend.VllmEngine`
    (vLLM's offline engine, continuous batching; a CUDA GPU and ``pip install 'pathvl[vllm]'``). Both
    decode greedily up to ``max_new_tokens``, so on the same inputs they write the same captions up to the
    numerics of their kernels (``tests/test_captioner_vllm.py`` checks the request path against the
    Hugging Face model). Sampling settings in the model's ``generation_config.json`` (e.g. a repetition
    penalty) apply to ``"hf"`` only.

    The backend is *not* part of :meth:`identity`: like ``device`` and ``dtype``, which identity also leaves
    out, it says how the same model answers the same question, not which captioner wrote the text, so a
    dataset half captioned on a CPU with ``"hf"`` may be finished on GPUs with ``"vllm"`` (or shards split
    between them) without ``--overwrite``. Every slide's captions still record the backend that wrote them
    (:meth:`info`: ``backend``, and ``vllm_version`` for vLLM).

    Args:
        model: Folder with the model, its processor and tokenizer (``save_pretrained`` layout).
        question: Question per patch; ``{mag}`` becomes its magnification (``"20"``).
        prompt: Prompt around the question (``{question}`` and the processor's image token, e.g.
            ``<image>``). ``None``: the processor's chat template when it has one, else
            :data:`LLAVA_PROMPT`.
        max_new_tokens: Longest caption in tokens.
        batch_size: Patches per generation call (``None``: 8 for ``"hf"``,
            :data:`~pathvl.data.captioners.vllm_backend.VLLM_BATCH_SIZE` for ``"vllm"``).
        device: ``"cuda"``, ``"cpu"``, ... (``None``: the GPU when present). ``"vllm"`` runs on the visible
            CUDA GPUs (choose them with ``CUDA_VISIBLE_DEVICES``) and takes only ``None`` or ``"cuda"``.
        dtype: ``"bf16"``, ``"fp16"`` or ``"fp32"`` (``None``: bf16 on a GPU, fp32 on a CPU; bf16 for vLLM).
        backend: ``"hf"`` (Hugging Face ``generate``) or ``"vllm"`` (vLLM's offline engine).
        engine: For ``"vllm"`` only: a ready engine instead of building ``vllm.LLM`` (an object with
            ``generate(requests, sampling_params, use_tqdm=False)``; tests inject a fake).

    Raises:
        FileNotFoundError: ``model`` missing or not a model folder; the message names ``--model``.
        UnknownBackendError: ``backend`` is not ``"hf"`` or ``"vllm"``, or ``device`` is not one vLLM runs on.
    """

    kind = "model"
    needs_pixels = True
    description = "generated by a local LLaVA-family vision-language model (greedy decoding)"

    def __init__(self, model: str | Path | None = None, question: str = DEFAULT_QUESTION,
                 prompt: str | None = None, max_new_tokens: int = 128, batch_size: int | None = None,
                 device: str | None = None, dtype: str | None = None, backend: str = "hf",
                 engine: Any = None) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise UnknownBackendError(f"unknown llava backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
        if backend == "vllm" and device not in (None, "cuda"):
            raise UnknownBackendError(f"the vllm backend runs on the visible CUDA GPUs, not on --device {device}; "
                                      "choose GPUs with CUDA_VISIBLE_DEVICES, or caption with --backend hf")
        if engine is not None and backend != "vllm":
            raise ValueError("an engine is used by the vllm backend only; pass backend='vllm'")
        if batch_size is None:
            batch_size = BACKENDS[backend]
        if model is None:
            raise FileNotFoundError("the llava captioner needs a local model folder: pass it with `--model PATH`")
        p = Path(model).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"llava model folder not found: {p}; pass a local LLaVA model in the "
                                    "Hugging Face format with `--model PATH`")
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p}: no config.json, not a Hugging Face model folder; pass the folder "
                                    "written by save_pretrained with `--model PATH`")
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be positive")
        if dtype not in (None, "bf16", "fp16", "fp32"):
            raise ValueError(f"dtype must be bf16, fp16 or fp32, got {dtype!r}")
        try:
            question.format(mag="20")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"question {question!r}: only {{mag}} may appear in braces ({e})") from e
        self.model_path = p.resolve()
        self.question = question
        self.prompt = prompt
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size)
        self.device_name = device
        self.dtype_name = dtype
        self.backend = backend
        self._engine = (VllmEngine(self.model_path, self.max_new_tokens, dtype=dtype, engine=engine)
                        if backend == "vllm" else None)
        self._model = None
        self._processor = None
        self._sha: str | None = None

    def options(self) -> dict[str, Any]:
        return {"model": str(self.model_path), "question": self.question, "prompt": self.prompt,
                "max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size,
                "device": self.device_name, "dtype": self.dtype_name, "decoding": "greedy",
                "backend": self.backend}

    def identity(self) -> dict[str, str]:
        """The captioner and its model folder; not the backend, device or dtype (see the class docstring)."""
        return {"captioner": self.name, "model_path": str(self.model_path)}

    def info(self) -> dict[str, Any]:
        out = super().info()
        if self._sha is None:
            self._sha = _weights_sha256(self.model_path)
        out.update(model_path=str(self.model_path), model_sha256=self._sha, question=self.question,
                   backend=self.backend)
        if self._engine is not None and self._processor is not None:
            out.update(self._engine.info())
        elif self._model is not None:
            out.update(device=str(self._device), dtype=str(self._dtype).replace("torch.", ""))
        return out

    def prepare(self) -> None:
        """Load the processor and the backend's generator (the Hugging Face model, or vLLM's engine).

        Raises:
            BackendUnavailableError: ``"vllm"`` without vLLM installed or without a CUDA GPU (before
                anything is loaded).
        """
        if self._processor is not None:
            return
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoProcessor

        if self._engine is not None:
            self._engine.load()  # refuses first, in one line, where vLLM cannot run
            self._processor = AutoProcessor.from_pretrained(self.model_path, local_files_only=True)
            return
        import torch
        from transformers import LlavaForConditionalGeneration

        dev = self.device_name or ("cuda" if torch.cuda.is_available() else "cpu")
        self._device = torch.device(dev)
        names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        if self.dtype_name is not None:
            self._dtype = names[self.dtype_name]
        else:
            self._dtype = torch.bfloat16 if self._device.type == "cuda" else torch.float32
        processor = AutoProcessor.from_pretrained(self.model_path, local_files_only=True)
        tok = processor.tokenizer
        tok.padding_side = "left"  # generation continues every row at its end
        if tok.pad_token is None:  # LLaMA tokenizers often have none; padding is masked anyway
            tok.pad_token = tok.unk_token or tok.eos_token
        model = LlavaForConditionalGeneration.from_pretrained(
            self.model_path, local_files_only=True, dtype=self._dtype)
        self._model = model.to(self._device).eval()
        self._processor = processor

    def _prompt(self, question: str) -> str:
        proc = self._processor
        image_token = getattr(proc, "image_token", "<image>")
        if self.prompt is not None:
            text = self.prompt.replace("{question}", question)
            return text if image_token in text else f"{image_token}\n{text}"
        if getattr(proc, "chat_template", None):
            conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return proc.apply_chat_template(conv, add_generation_prompt=True)
        return LLAVA_PROMPT.replace("<image>", image_token).replace("{question}", question)

    def caption(self, patches: Sequence[np.ndarray | None], meta: Sequence[dict]) -> list[str]:
        from PIL import Image

        self.prepare()
        out: list[str] = []
        for s in range(0, len(meta), self.batch_size):
            imgs = [Image.fromarray(np.asarray(p, dtype=np.uint8)).convert("RGB")
                    for p in patches[s:s + self.batch_size]]
            texts = [self._prompt(self.question.format(mag=_mag_text(m["magnification"])))
                     for m in meta[s:s + self.batch_size]]
            raw = self._engine.generate(imgs, texts) if self._engine is not None else self._generate_hf(imgs, texts)
            out += [t.strip() for t in raw]
            self.counts["generated"] += len(imgs)
        return out

    def _generate_hf(self, imgs: list, texts: list[str]) -> list[str]:
        """Greedy ``model.generate`` on one left-padded batch; the new tokens decoded, not stripped."""
        import torch

        batch = self._processor(images=imgs, text=texts, return_tensors="pt", padding=True)
        batch = {k: (v.to(self._device, self._dtype) if k == "pixel_values" else v.to(self._device))
                 for k, v in batch.items()}
        tok = self._processor.tokenizer
        with torch.inference_mode():
            ids = self._model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                       num_beams=1, pad_token_id=tok.pad_token_id)
        new = ids[:, batch["input_ids"].shape[1]:]
        return self._processor.batch_decode(new, skip_special_tokens=True)
