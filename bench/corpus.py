"""The benchmark corpus: photo-like images generated deterministically and cached in `bench/.cache/`.

Real photos compress to roughly 1-4 bits per pixel because they hold smooth colour fields plus fine
detail and sensor grain. The generator imitates that: a small random colour field enlarged with a
smooth interpolator (large shapes and gradients), plus fine Gaussian grain, all from fixed seeds, so
every run on every machine works on the same bytes. The images are written with libvips (which the
worker does not share state with: the bench runs it in the parent process only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache" / "corpus"
_VERSION = "v1"  # bump to regenerate everything


@dataclass(frozen=True)
class Spec:
    name: str
    width: int
    height: int
    fmt: str  # jpeg | jpeg-progressive | png-alpha | webp | avif
    seed: int
    grain: float = 5  # the sensor grain's sigma: a high-ISO photo's is larger, and so is its file

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6

    @property
    def ext(self) -> str:
        return {"jpeg": "jpg", "jpeg-progressive": "jpg", "png-alpha": "png", "webp": "webp", "avif": "avif"}[
            self.fmt
        ]

    @property
    def content_type(self) -> str:
        return {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp", "avif": "image/avif"}[self.ext]

    @property
    def path(self) -> Path:
        return CACHE / f"{self.name}-{self.width}x{self.height}-{_VERSION}.{self.ext}"


#: What the throughput runs cycle through: three JPEG sizes, a progressive JPEG, PNG with alpha, WebP.
THROUGHPUT = (
    Spec("jpeg-2mp", 1728, 1152, "jpeg", 2),
    Spec("jpeg-12mp", 4000, 3000, "jpeg", 12),
    Spec("jpeg-24mp", 6000, 4000, "jpeg", 24),
    Spec("jpeg-24mp-progressive", 6000, 4000, "jpeg-progressive", 25),
    Spec("png-alpha-4mp", 2400, 1600, "png-alpha", 4),
    Spec("webp-12mp", 4000, 3000, "webp", 13),
)
#: The 100 MP image for the memory figures (the default IMGPIPE_MAX_PIXELS accepts it exactly).
HUGE = Spec("jpeg-100mp", 10000, 10000, "jpeg", 100)
#: The hungriest decodes the default decode budget (IMGPIPE_MAX_DECODE_BYTES) lets through, for the
#: memory figures: a progressive JPEG without chroma subsampling (libjpeg holds 6 bytes a pixel of
#: coefficients; the generator's quality 90 turns subsampling off) just within it, and a 12 MP AVIF
#: (libheif, about 16 bytes a pixel), as phones write them. `tests/bench` holds them to the budget.
LARGEST_PROGRESSIVE = Spec("jpeg-26mp-progressive", 6216, 4144, "jpeg-progressive", 26)
AVIF = Spec("avif-12mp", 4000, 3000, "avif", 14)
#: The same progressive JPEG as a high-ISO photo: its 15 MB file still fits the room the budget sets
#: aside for sources (`imaging.SOURCE_ROOM_BYTES`, 16 MiB), but two do not, so the next job's copy is
#: not downloaded ahead of its render. Before that room was kept, it took a worker at concurrency 1
#: to 311 MiB (one of 7 MB: 292 MiB).
GRAINY_PROGRESSIVE = Spec("jpeg-26mp-progressive-grainy", 6216, 4144, "jpeg-progressive", 26, grain=40)
MEMORY = (HUGE, LARGEST_PROGRESSIVE, GRAINY_PROGRESSIVE, AVIF)
BY_NAME = {s.name: s for s in (*THROUGHPUT, *MEMORY)}


def _photo(spec: Spec):
    import pyvips

    w, h = spec.width, spec.height
    # Large shapes: a coarse random colour field, blurred and enlarged smoothly.
    coarse = pyvips.Image.gaussnoise(max(8, w // 96), max(8, h // 96), sigma=60, mean=128, seed=spec.seed)
    coarse = coarse.bandjoin(
        [
            pyvips.Image.gaussnoise(coarse.width, coarse.height, sigma=60, mean=110, seed=spec.seed + 1000),
            pyvips.Image.gaussnoise(coarse.width, coarse.height, sigma=60, mean=90, seed=spec.seed + 2000),
        ]
    )
    coarse = coarse.gaussblur(1.2)
    field = coarse.resize(w / coarse.width, vscale=h / coarse.height, kernel="cubic")
    # Texture at middle scale and sensor grain at pixel scale.
    mid = pyvips.Image.gaussnoise(max(8, w // 8), max(8, h // 8), sigma=18, mean=0, seed=spec.seed + 3000)
    mid = mid.resize(w / mid.width, vscale=h / mid.height, kernel="linear")
    grain = pyvips.Image.gaussnoise(w, h, sigma=spec.grain, mean=0, seed=spec.seed + 4000)
    image = (field + mid + grain).cast("uchar").copy(interpretation="srgb")
    return image.crop(0, 0, w, h)


def generate(spec: Spec) -> Path:
    """The file of `spec`, generated on first use."""
    if spec.path.exists():
        return spec.path
    import pyvips

    CACHE.mkdir(parents=True, exist_ok=True)
    image = _photo(spec)
    tmp = spec.path.with_suffix(".tmp")
    if spec.fmt == "jpeg":
        data = image.jpegsave_buffer(Q=90, keep=0)
    elif spec.fmt == "jpeg-progressive":
        data = image.jpegsave_buffer(Q=90, interlace=True, optimize_coding=True, keep=0)
    elif spec.fmt == "png-alpha":
        # Alpha: an opaque centre fading to transparent edges, like a cut-out product shot.
        xy = pyvips.Image.xyz(spec.width, spec.height)
        cx, cy = spec.width / 2, spec.height / 2
        d = ((xy[0] - cx) ** 2 / cx**2 + (xy[1] - cy) ** 2 / cy**2) ** 0.5
        alpha = ((1.2 - d) * 400).cast("uchar")  # libvips casts clip to 0..255
        data = image.bandjoin(alpha).copy(interpretation="srgb").pngsave_buffer(compression=6, keep=0)
    elif spec.fmt == "webp":
        data = image.webpsave_buffer(Q=85, keep=0)
    elif spec.fmt == "avif":
        data = image.heifsave_buffer(compression="av1", Q=60, effort=2, keep=0)
    else:
        raise ValueError(spec.fmt)
    tmp.write_bytes(data)
    tmp.rename(spec.path)
    del pyvips
    return spec.path


def load(specs=THROUGHPUT) -> dict[str, bytes]:
    return {s.name: generate(s).read_bytes() for s in specs}


if __name__ == "__main__":
    import time

    for s in (*THROUGHPUT, *MEMORY):
        t = time.perf_counter()
        p = generate(s)
        size = p.stat().st_size
        print(
            f"{s.name:24} {s.width}x{s.height} {size / 1e6:6.2f} MB "
            f"{8 * size / (s.width * s.height):.2f} bpp  {time.perf_counter() - t:.1f}s"
        )
