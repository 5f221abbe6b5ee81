#!/usr/bin/env python3
"""The import graph of the workspace, checked: every arrow between crates and between the
modules of a crate runs one way (ARCHITECTURE.md, "Layers").

Crates: the `gantry-*` dependencies of each crate's Cargo.toml (normal and build; dev
dependencies are for tests). Modules: each source file under `crates/*/src` is one
module (`src/a.rs` and `src/a/mod.rs` are `a`, `src/a/b.rs` is `a::b`); an arrow goes
from a file to the module a `crate::`, `super::` or `self::` path in it names (the
longest module prefix of the path). A module's own children and parent are modules like
any other: a parent that re-exports from a child and a child that imports through its
parent make a circle. Test code is left out (a `#[cfg(test)]` inline module, and a
module a `#[cfg(test)] mod name;` declares): a test may reach anywhere.

Prints the crate graph and, per crate, the module graph (one line per module: what it
imports), then every circle found. Exits 1 when a circle is found that is not in
`.ci/layers-known.txt` (circles still being taken apart, one per line, the modules
sorted and joined by spaces), or a known one has grown; 0 otherwise.
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PATH = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
USE_GROUP = re.compile(r"\buse\s+(crate|super|self)::((?:[A-Za-z_][A-Za-z0-9_]*::)*)\{([^;]*)\}", re.S)


def crate_deps():
    deps = {}
    for toml in sorted(ROOT.glob("crates/*/Cargo.toml")):
        text = toml.read_text()
        name = re.search(r'^name\s*=\s*"([^"]+)"', text, re.M).group(1)
        found = set()
        section = None
        for line in text.splitlines():
            header = re.match(r"^\[(.+)\]", line.strip())
            if header:
                section = header.group(1)
                continue
            if section in ("dependencies", "build-dependencies"):
                m = re.match(r"^(gantry-[a-z-]+)\s*[.=]", line.strip())
                if m:
                    found.add(m.group(1))
        deps[name] = (toml.parent, sorted(found))
    return deps


def module_of(src: pathlib.Path, file: pathlib.Path):
    rel = file.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "mod":
        parts.pop()
    if parts in (["lib"], ["main"]):
        return ()
    return tuple(parts)


def strip_comments(text):
    out = []
    for line in text.splitlines():
        i = line.find("//")
        out.append(line if i < 0 else line[:i])
    return "\n".join(out)


TEST_MOD_FILE = re.compile(r"#\[cfg\(test\)\]\s*(?:pub(?:\([a-z]+\))?\s+)?mod\s+(\w+)\s*;")
TEST_MOD_BLOCK = re.compile(r"#\[cfg\(test\)\]\s*(?:pub(?:\([a-z]+\))?\s+)?mod\s+\w+\s*\{")


def without_test_blocks(text):
    """The text with every `#[cfg(test)] mod name { ... }` cut out."""
    while True:
        m = TEST_MOD_BLOCK.search(text)
        if not m:
            return text
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        text = text[: m.start()] + text[i:]


def arrows_of(src: pathlib.Path):
    files = sorted(src.rglob("*.rs"))
    modules = {module_of(src, f): f for f in files}
    # Modules that exist only for tests, and their descendants, are not rooms of the house.
    test_only = set()
    for module, file in modules.items():
        for name in TEST_MOD_FILE.findall(strip_comments(file.read_text())):
            test_only.add(module + (name,))
    modules = {
        m: f
        for m, f in modules.items()
        if not any(m[: len(t)] == t for t in test_only)
    }
    graph = {m: set() for m in modules}

    def resolve(here, head, rest):
        if head == "crate":
            base = []
        elif head == "self":
            base = list(here)
        else:
            base = list(here)
            while rest and rest[0] == "super":
                rest = rest[1:]
                base = base[:-1]
            base = base[:-1]
        path = base + rest
        for n in range(len(path), -1, -1):
            if tuple(path[:n]) in modules:
                return tuple(path[:n])
        return None

    for module, file in modules.items():
        # A file that is a directory's mod.rs sits one level below its path.
        here = module
        text = without_test_blocks(strip_comments(file.read_text()))
        targets = set()
        for head, tail, group in USE_GROUP.findall(text):
            prefix = [p for p in tail.split("::") if p]
            for item in re.split(r"[,\s]+", group):
                item = item.strip().split(" as ")[0]
                first = re.match(r"[A-Za-z_][A-Za-z0-9_]*(?:::[A-Za-z_][A-Za-z0-9_]*)*", item)
                if not first:
                    continue
                targets.add(resolve(here, head, prefix + first.group(0).split("::")))
        for head, tail in PATH.findall(text):
            targets.add(resolve(here, head, [p for p in tail.split("::") if p]))
        for t in targets:
            if t is not None and t != module:
                graph[module].add(t)
    return graph


def circles(graph):
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def name(crate, module):
    return crate + ("::" + "::".join(module) if module else "")


def main():
    known_file = ROOT / ".ci" / "layers-known.txt"
    known = []
    if known_file.exists():
        for line in known_file.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                known.append(set(line.split()))
    deps = crate_deps()
    print("crates (each: the gantry crates it depends on)")
    for crate, (_, ds) in deps.items():
        print(f"  {crate}: {', '.join(ds) or '-'}")
    found = []
    crate_graph = {c: set(ds) & set(deps) for c, (_, ds) in deps.items()}
    found += [sorted(c) for c in circles(crate_graph)]
    for crate, (dir_, _) in deps.items():
        src = dir_ / "src"
        if not src.is_dir():
            continue
        graph = arrows_of(src)
        print(f"modules of {crate}")
        for m in sorted(graph):
            targets = ", ".join(name(crate, t) for t in sorted(graph[m])) or "-"
            print(f"  {name(crate, m)} -> {targets}")
        found += [sorted(name(crate, m) for m in c) for c in circles(graph)]
    bad = 0
    for c in found:
        members = set(c)
        allowed = any(members <= k for k in known)
        label = "known circle, being taken apart" if allowed else "CIRCLE"
        print(f"{label} ({len(c)}): {' '.join(c)}")
        if not allowed:
            bad += 1
    if bad:
        print(f"{bad} circle(s) not in .ci/layers-known.txt: an arrow runs back up", file=sys.stderr)
        return 1
    print(f"{len(found)} circle(s), all known" if found else "no circles: every arrow runs one way")
    return 0


if __name__ == "__main__":
    sys.exit(main())
