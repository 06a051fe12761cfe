"""Summarise a py-spy ``--format raw`` profile (collapsed stacks).

    python bench/profile_summary.py PROFILE.txt [--seconds S --rate R] [--top N]

Prints the functions with the most self time and the most inclusive time, and,
for a profile taken with ``--threads``, each thread's share of wall time on CPU
with its own top functions.  Frames are shown as ``function (file)`` with line
numbers dropped, so one function's lines add up.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _frame(raw: str) -> str:
    match = _FRAME.match(raw.strip())
    if not match:
        return raw.strip()
    return f"{match['func']} ({match['file']})"


def load(path: Path) -> list[tuple[list[str], int]]:
    stacks: list[tuple[list[str], int]] = []
    for line in path.read_text().splitlines():
        match = _LINE.match(line)
        if match:
            frames = [_frame(f) for f in match["stack"].split(";") if f]
            stacks.append((frames, int(match["count"])))
    return stacks


def summarise(
    stacks: list[tuple[list[str], int]], top: int = 15
) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    total = sum(count for _, count in stacks)
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, count in stacks:
        if frames:
            self_time[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    return total, self_time.most_common(top), inclusive.most_common(top * 3)


def share(stacks: list[tuple[list[str], int]], needle: str) -> int:
    """Samples with a frame whose text contains ``needle``."""
    return sum(count for frames, count in stacks if any(needle in f for f in frames))


def report(path: Path, seconds: float | None, rate: int | None, top: int) -> str:
    stacks = load(path)
    total, self_top, incl_top = summarise(stacks, top)
    out = [f"profile {path.name}: {total} samples"]
    if seconds and rate:
        out.append(f"  on-CPU share of one core: {total / (seconds * rate):.0%}")
    if not total:
        return "\n".join(out)
    out.append("  self time:")
    out += [f"    {n / total:6.1%}  {name}" for name, n in self_top]
    out.append("  inclusive time:")
    out += [f"    {n / total:6.1%}  {name}" for name, n in incl_top]
    return "\n".join(out)


def per_thread(path: Path, seconds: float, rate: int, top: int = 8) -> str:
    """Each thread's on-CPU share of wall time, and its top functions by self time.

    Needs a profile recorded with ``--threads`` (the first frame names the thread).
    """
    threads: dict[str, list[tuple[list[str], int]]] = {}
    for frames, count in load(path):
        name = frames[0] if frames and frames[0].startswith("thread (") else "all threads"
        name = re.sub(r"^thread \(\d+\): ", "thread ", name)
        rest = frames[1:] if name != "all threads" else frames
        threads.setdefault(name, []).append((rest, count))
    expected = seconds * rate
    out: list[str] = []
    for name, stacks in sorted(threads.items(), key=lambda item: -sum(c for _, c in item[1])):
        total, self_top, _ = summarise(stacks, top)
        out.append(f"{name}: on CPU {total / expected:.0%} of the time ({total} samples)")
        out += [f"  {n / total:6.1%}  {func}" for func, n in self_top]
    return "\n".join(out)


# What a gateway worker's threads wait on, from a ``--native --idle`` profile.
WAITS = (
    ("sqlite3InvokeBusyHandler", "SQLite busy handler: asleep, the write lock is taken"),
    ("fdatasync", "fdatasync: making the commit durable"),
    ("fsync", "fsync: making the commit durable"),
    ("nanosleep", "asleep (time.sleep)"),
    ("epoll_", "idle in the event loop (epoll)"),
    ("_next_group", "waiting for requests to commit"),
    ("Condition.wait", "waiting on a condition"),
)


def waits(path: Path) -> str:
    """Per thread: the share of samples in each kind of wait; the rest is work."""
    threads: dict[str, dict[str, int]] = {}
    for frames, count in load(path):
        if not frames:
            continue
        name = re.sub(r"^thread \(\d+\): ", "thread ", frames[0])
        kinds = threads.setdefault(name, {})
        text = ";".join(frames)
        label = "working (on CPU or runnable)"
        for needle, meaning in WAITS:
            if needle in text:
                label = meaning
                break
        kinds[label] = kinds.get(label, 0) + count
    out: list[str] = []
    for name, kinds in sorted(threads.items(), key=lambda item: -sum(item[1].values())):
        total = sum(kinds.values())
        out.append(f"{name} ({total} samples):")
        for label, count in sorted(kinds.items(), key=lambda item: -item[1]):
            out.append(f"  {count / total:6.1%}  {label}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("profile", type=Path)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--rate", type=int)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument(
        "--threads", action="store_true", help="per thread (needs --seconds/--rate)"
    )
    parser.add_argument("--waits", action="store_true", help="a --native --idle profile's waits")
    args = parser.parse_args()
    if args.waits:
        print(waits(args.profile))
    elif args.threads and args.seconds and args.rate:
        print(per_thread(args.profile, args.seconds, args.rate, args.top))
    else:
        print(report(args.profile, args.seconds, args.rate, args.top))


if __name__ == "__main__":
    main()
