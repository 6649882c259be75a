"""Decode clips in a fresh process and print what it cost, as one JSON line.

Run by ``tests/test_clip_decoding.py`` (and by hand against an older checkout, with
``PYTHONPATH`` pointing at it) so that memory is measured in a process that holds nothing else:

    python tests/clip_decode_probe.py CLIP [--copies N] [--warm WARM_CLIP] [--max-s S]

``--copies`` decodes N copies at once on threads, as the server does for concurrent
registrations. The peak is VmHWM after resetting it (``/proc/self/clear_refs``), so imports and
the warm-up clip do not count.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import time
from pathlib import Path


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("clip", type=Path)
    parser.add_argument("--copies", type=int, default=1)
    parser.add_argument("--warm", type=Path, default=None)
    parser.add_argument("--max-s", type=float, default=30.0)
    args = parser.parse_args()

    import live
    from live.audio import canonicalize
    from protocol.errors import LivevoiceError

    def decode(data: bytes) -> tuple[str, str]:
        try:
            clip = canonicalize(data, max_s=args.max_s)
        except LivevoiceError as exc:
            return exc.code, exc.message
        return "ok", f"{clip.duration_s:.2f} s"

    if args.warm is not None:  # first use loads lazy imports (the VAD): not the clip's cost
        decode(args.warm.read_bytes())
    data = args.clip.read_bytes()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    rss_kb = _status_kb("VmRSS")
    cpu = time.process_time()
    with concurrent.futures.ThreadPoolExecutor(args.copies) as pool:
        answers = list(pool.map(decode, [data] * args.copies))
    cpu_s = time.process_time() - cpu
    peak_kb = _status_kb("VmHWM")
    print(
        json.dumps(
            {
                "live": str(Path(live.__file__).parent),
                "code": answers[0][0],
                "message": answers[0][1],
                "same_answers": len(set(answers)) == 1,
                "cpu_s": round(cpu_s, 3),
                "rss_before_mb": round(rss_kb / 1024, 1),
                "peak_growth_mb": round((peak_kb - rss_kb) / 1024, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
