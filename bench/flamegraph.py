"""A flame graph, as SVG, of one path through tagd, from py-spy's raw (collapsed) stacks.

py-spy's own flame graph shows the whole process, where the visitor's path and the
reactor's machinery crowd out what one asks about.  This draws only the reactor
thread's samples whose stack passes through a frame containing one of the C{--root}
texts, cut to start at the first such frame, e.g. the delivery path: C{--root
tagd/delivery/} (a platform's answer arrives through the platforms' agent's
C{dataReceived}, in C{tagd/delivery/client.py}, not under the dispatcher's loop).  Widths are shares
of those samples; each box's title (shown on hover) gives its share of every busy sample
of the reactor thread, so that the path's cost reads against the whole.

C{.venv/bin/python bench/flamegraph.py prof/tagd-meta+ga4+tiktok.txt --root tagd/delivery/ -o delivery.svg}
"""

from __future__ import annotations

import argparse
import html
import sys
import zlib

WIDTH = 1200
ROW = 17
FONT = 11
MIN_WIDTH = 0.5  # pixels: narrower boxes are not drawn (their share is in their parent)


def read_stacks(path: str) -> list[tuple[list[str], int]]:
    """(frames from the outermost, samples) for each line of py-spy's raw output, the
    line numbers dropped so that one function is one box."""
    stacks = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if stack and count.isdigit():
                frames = [frame.rsplit(":", 1)[0] + ")" if frame.endswith(")") else frame for frame in stack.split(";")]
                stacks.append((frames, int(count)))
    return stacks


def busy_reactor(stacks):
    """The reactor thread's samples that are work, not its wait in C{epoll}."""
    return [(frames, n) for frames, n in stacks
            if not frames[0].startswith("Thread._bootstrap") and "EPollReactor.doPoll" not in frames[-1]]


def rooted(stacks, roots: list[str]):
    """The stacks through a frame containing one of C{roots}, cut to start at the first."""
    kept = []
    for frames, n in stacks:
        at = next((i for i, frame in enumerate(frames) if any(root in frame for root in roots)), None)
        if at is not None:
            kept.append((frames[at:], n))
    return kept


def tree(stacks) -> dict:
    """Nested {frame: [samples, children]}."""
    top: dict = {}
    for frames, n in stacks:
        level = top
        for frame in frames:
            node = level.setdefault(frame, [0, {}])
            node[0] += n
            level = node[1]
    return top


def _colour(name: str) -> str:
    """Warm colours, stable per function; tagd's own frames redder than the libraries'."""
    h = zlib.crc32(name.encode())
    red = 230 if "tagd/" in name else 205
    return f"rgb({red},{90 + h % 110},{40 + (h >> 8) % 50})"


def svg(stacks, total_busy: int, title: str) -> str:
    top = tree(stacks)
    samples = sum(node[0] for node in top.values())
    depth = 0
    boxes = []

    def walk(level: dict, x: float, row: int) -> None:
        nonlocal depth
        depth = max(depth, row + 1)
        for frame, (n, children) in sorted(level.items()):
            width = WIDTH * n / samples
            if width >= MIN_WIDTH:
                boxes.append((x, row, width, frame, n))
                walk(children, x, row + 1)
            x += width

    walk(top, 0.0, 0)
    height = (depth + 2) * ROW
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="monospace" '
           f'font-size="{FONT}">',
           f'<text x="4" y="{ROW - 4}">{html.escape(title)}: {samples:,} samples, '
           f'{100 * samples / total_busy:.1f} % of the reactor thread\'s busy samples</text>']
    for x, row, width, frame, n in boxes:
        y = height - (row + 1) * ROW  # the root at the bottom, as flame graphs go
        label = frame if len(frame) * FONT * 0.6 < width - 4 else frame[: max(0, int((width - 4) / (FONT * 0.6)) - 2)] + ".."
        share = f"{frame}: {100 * n / samples:.1f} % of this path, {100 * n / total_busy:.1f} % of the reactor's busy samples"
        out.append(f'<g><title>{html.escape(share)}</title><rect x="{x:.1f}" y="{y}" width="{width:.1f}" '
                   f'height="{ROW - 1}" fill="{_colour(frame)}"/>'
                   + (f'<text x="{x + 2:.1f}" y="{y + ROW - 5}">{html.escape(label)}</text>' if len(label) > 2 else "")
                   + "</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("raw", help="py-spy record -f raw output")
    parser.add_argument("--root", required=True, action="append",
                        help="text of a frame the graph starts at, e.g. tagd/delivery/ (more than once: any of them)")
    parser.add_argument("--title", help="the graph's heading (default: the roots)")
    parser.add_argument("-o", "--output", required=True, help="the SVG file to write")
    args = parser.parse_args(argv)
    busy = busy_reactor(read_stacks(args.raw))
    kept = rooted(busy, args.root)
    if not kept:
        print(f"no busy reactor sample passes through a frame containing any of {args.root}")
        return 1
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(svg(kept, sum(n for _, n in busy), args.title or " or ".join(args.root)))
    print(f"{sum(n for _, n in kept):,} of {sum(n for _, n in busy):,} busy reactor samples written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
