"""Loading a ``pathvl segment train`` run folder, and ``pathvl segment eval`` on a mask folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pathvl.eval.finetune.config import FinetuneError, LoRASettings
from pathvl.eval.finetune.files import _atomic, _read_run_config, load_weights, write_json
from pathvl.eval.finetune.model import build_encoder, resolve_device
from pathvl.eval.segment.common import CONFIG_FILE, FORMAT, MODEL_FILE, SegmentError, _save_png
from pathvl.eval.segment.data import _loader, _normalise, mask_folder
from pathvl.eval.segment.scores import _markdown, confusion_matrix, segmentation_scores
from pathvl.eval.segment.training import _load_state

if TYPE_CHECKING:
    import torch

    from pathvl.encoders import VisionEncoder
    from pathvl.models.segmentation import SegmentationModel


@dataclass
class Segmenter:
    """A trained segmentation model with its preprocessing (what :func:`load_segmenter` returns).

    Attributes:
        model: The :class:`~pathvl.models.segmentation.SegmentationModel` (eval mode).
        vision: The vision encoder (its module is ``model.encoder``).
        classes: Class name of each id.
        ignore_index: Id of unlabelled pixels in masks.
        tile_px: Side of the tiles the model reads.
        config: The run's ``segment.json``.
        source: The run folder.
    """

    model: SegmentationModel
    vision: VisionEncoder
    classes: list[str]
    ignore_index: int
    tile_px: int
    config: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, K, S, S)`` logits of ``(B, S, S, 3)`` uint8 tiles."""
        import torch

        with torch.no_grad():
            return self.model(_normalise(self.vision, images, self.device)).float()

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, S, S)`` int64 class ids of ``(B, S, S, 3)`` uint8 tiles, on the CPU."""
        return self.logits(images).argmax(1).cpu()


def load_segmenter(run_dir: str | Path, device: str | torch.device = "cpu",
                   encoder_weights: str | None = None) -> Segmenter:
    """Loads a ``pathvl segment train`` run folder (its best epoch).

    Raises:
        SegmentError: Not a segmentation run (another kind of run says which), or weights that do not fit.
    """
    import torch

    from pathvl.models.segmentation import SegmentationModel, build_seg_head

    run = Path(run_dir)
    try:
        cfg = _read_run_config(run, CONFIG_FILE, FORMAT, "a segmentation run", "pathvl segment train")
        e = cfg["encoder"]
        enc = build_encoder(e["name"], encoder_weights or e.get("weights_path"), e.get("weights_sha256"),
                            where=f"{run / CONFIG_FILE}: ")
        state = load_weights(run / MODEL_FILE, "segmentation")
    except FinetuneError as err:
        raise SegmentError(str(err)) from None
    if cfg.get("lora"):
        LoRASettings.from_dict(cfg["lora"]).apply(enc.model)
    h = cfg["head"]
    head = build_seg_head(h["kind"], int(e["token_channels"]), len(cfg["classes"]), width=int(h["width"]),
                          dropout=float(h["dropout"]))
    model = SegmentationModel(enc.model, head)
    _load_state(model, state, run / MODEL_FILE)
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    model.to(dev).eval()
    return Segmenter(model, enc, list(cfg["classes"]), int(cfg["ignore_index"]), int(cfg["tile_px"]), cfg, str(run))


def evaluate_segmentation(run_dir: str | Path, data: str | Path, *, encoder_weights: str | None = None,
                          batch_size: int = 16, workers: int = 0, device: str = "cpu",
                          out: str | Path | None = None, save_masks: bool = False) -> dict[str, Any]:
    """mIoU, Dice per class and pixel accuracy of a trained run on a mask folder.

    The folder's masks are read with the run's classes (a mask id that is not one of them is an error).

    Args:
        run_dir: A ``pathvl segment train`` run folder.
        data: A mask folder.
        encoder_weights: The encoder's weights, when the recorded file is elsewhere here.
        batch_size: Tiles per batch.
        workers: DataLoader workers.
        device: Where to run.
        out: Write ``segment_eval.json``/``.md`` there (and the predicted masks with ``save_masks``).
        save_masks: Also write ``OUT/predictions/<name>.png`` (class ids).

    Raises:
        SegmentError: Not a segmentation run, or masks that do not fit.
    """
    seg = load_segmenter(run_dir, device=device, encoder_weights=encoder_weights)
    ds = mask_folder(data, tile_px=seg.tile_px, classes=seg.classes, ignore_index=seg.ignore_index)
    k = len(seg.classes)
    cm = np.zeros((k, k), dtype=np.int64)
    names = ds.names
    i = 0
    for x, m in _loader(ds, batch_size, workers, False, 0):
        pred = seg.predict(x).numpy()
        cm += confusion_matrix(pred, m.numpy(), k, ds.ignore_index)
        if out is not None and save_masks:
            for p in pred:
                _save_png(Path(out) / "predictions" / (Path(names[i]).stem + ".png"), p.astype(np.uint8))
                i += 1
    report = segmentation_scores(cm, seg.classes)
    report["model"] = {"run": str(run_dir), "encoder": seg.config["encoder"]["name"],
                       "head": seg.config["head"]["kind"], "lora": seg.config.get("lora"), "tile_px": seg.tile_px}
    report["data"] = {"masks": str(data), "images": len(ds)}
    if out is not None:
        write_json(Path(out) / "segment_eval.json", report)
        _atomic(Path(out) / "segment_eval.md", lambda p: p.write_text(
            _markdown(report, f"Segmentation: {Path(data).name}"), encoding="utf-8"))
    return report
