"""The loss log of a run: CSV, a TensorBoard event file and a plot, in `output/NAME/`.

The moving average is kohya's `LossRecorder` (over the last epoch's worth of steps). The event
file is written here record by record (TFRecord framing with masked CRC-32C around `Event`
protocol buffers, scalar summaries under kohya's tags `loss/current`, `loss/average`, `lr/unet`,
`lr/textencoder`), so TensorBoard reads it without nodegraph depending on TensorFlow or protobuf.
"""

from __future__ import annotations

import csv
import socket
import struct
import time
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw


class LossRecorder:
    """kohya's `LossRecorder`: epoch 0 appends; later epochs replace the loss at the same step."""

    def __init__(self) -> None:
        self.loss_list: list[float] = []
        self.loss_total = 0.0

    def add(self, epoch: int, step: int, loss: float) -> None:
        if epoch == 0:
            self.loss_list.append(loss)
        else:
            while len(self.loss_list) <= step:
                self.loss_list.append(0.0)
            self.loss_total -= self.loss_list[step]
            self.loss_list[step] = loss
        self.loss_total += loss

    @property
    def moving_average(self) -> float:
        return self.loss_total / len(self.loss_list) if self.loss_list else 0.0

    def state(self) -> dict[str, Any]:
        return {"loss_list": list(self.loss_list), "loss_total": self.loss_total}

    def load(self, state: dict[str, Any]) -> None:
        self.loss_list, self.loss_total = list(state["loss_list"]), float(state["loss_total"])


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event_bytes(
    wall_time: float, step: int, scalars: dict[str, float] | None = None, version: str = ""
) -> bytes:
    """One serialised `tensorboard.Event`: wall_time (1), step (2), file_version (3) or summary (5)."""
    body = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
    if version:
        body += _field(3, version.encode())
    if scalars:
        values = b"".join(
            _field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
            for tag, value in scalars.items()
        )
        body += _field(5, values)
    return body


def record(data: bytes) -> bytes:
    """TFRecord framing: length, its masked CRC, the data, its masked CRC."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked(length)) + data + struct.pack("<I", _masked(data))


class TrainingLog:
    """`loss.csv`, `events.out.tfevents.*` and `loss.png` of one run (appending on resume)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.csv_path = folder / "loss.csv"
        self.plot_path = folder / "loss.png"
        self.rows: list[tuple[int, float, float]] = []
        if self.csv_path.exists():
            with self.csv_path.open(encoding="utf-8") as fh:
                self.rows = [
                    (int(r["step"]), float(r["loss"]), float(r["average"])) for r in csv.DictReader(fh)
                ]
        else:
            self.csv_path.write_text("step,epoch,loss,average,lr_unet,lr_textencoder\n", encoding="utf-8")
        logs = folder / "tensorboard"
        logs.mkdir(exist_ok=True)
        now = time.time()
        self.event_path = logs / f"events.out.tfevents.{int(now)}.{socket.gethostname()}"
        with self.event_path.open("ab") as fh:
            fh.write(record(event_bytes(now, 0, version="brain.Event:2")))

    def add(self, step: int, epoch: int, loss: float, average: float, lrs: list[float]) -> None:
        """One optimizer step (the plot is redrawn by `plot`)."""
        te_lr = f"{lrs[1]:.6g}" if len(lrs) > 1 else ""
        with self.csv_path.open("a", encoding="utf-8") as fh:
            fh.write(f"{step},{epoch},{loss:.6g},{average:.6g},{lrs[0]:.6g},{te_lr}\n")
        scalars = {"loss/current": loss, "loss/average": average, "lr/unet": lrs[0]}
        if len(lrs) > 1:
            scalars["lr/textencoder"] = lrs[1]
        with self.event_path.open("ab") as fh:
            fh.write(record(event_bytes(time.time(), step, scalars)))
        self.rows.append((step, loss, average))

    def plot(self) -> Path:
        """Draw the loss (grey) and its moving average (blue) against the step."""
        width, height, pad = 640, 360, 40
        img = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(img)
        draw.rectangle((pad, pad // 2, width - pad // 2, height - pad), outline="black")
        if self.rows:
            steps = [r[0] for r in self.rows]
            values = [v for r in self.rows for v in r[1:]]
            lo, hi = min(values), max(values)
            span, s0, s1 = (hi - lo) or 1.0, min(steps), max(steps)

            def xy(step: int, value: float) -> tuple[float, float]:
                x = pad + (step - s0) / ((s1 - s0) or 1) * (width - 1.5 * pad)
                return x, height - pad - (value - lo) / span * (height - 1.5 * pad)

            for column, colour in ((1, (160, 160, 160)), (2, (30, 90, 200))):
                points = [xy(r[0], r[column]) for r in self.rows]
                if len(points) > 1:
                    draw.line(points, fill=colour, width=2)
                else:
                    draw.ellipse(
                        (points[0][0] - 2, points[0][1] - 2, points[0][0] + 2, points[0][1] + 2), fill=colour
                    )
            draw.text((pad, height - pad + 6), f"step {s0}", fill="black")
            draw.text((width - 3 * pad, height - pad + 6), f"step {s1}", fill="black")
            draw.text((4, pad // 2), f"{hi:.4g}", fill="black")
            draw.text((4, height - pad - 10), f"{lo:.4g}", fill="black")
        draw.text((pad + 6, pad // 2 + 4), "loss (grey), moving average (blue)", fill="black")
        partial = self.plot_path.with_name(".loss.png.partial")
        img.save(partial, format="PNG")
        partial.replace(self.plot_path)
        return self.plot_path
