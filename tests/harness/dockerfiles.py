"""Reading Dockerfiles without Docker: instructions, stages, ARG defaults, and the build-context
filter (``<Dockerfile>.dockerignore``), enough to check the images against the code.

Continuation lines are joined, comments dropped, and heredoc bodies (``RUN python - <<'EOF'``)
kept with their instruction but never read as instructions themselves.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ENV, ...
    arguments: str
    heredoc: str = ""

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form ENTRYPOINT/CMD/HEALTHCHECK CMD, else None."""
        text = self.arguments
        if self.keyword == "HEALTHCHECK":
            text = text.split(" CMD ", 1)[1] if " CMD " in text else ""
        text = text.strip()
        return json.loads(text) if text.startswith("[") else None

    def flags(self) -> dict[str, str]:
        """``--from=x --chown=y`` style flags before the arguments."""
        return dict(re.findall(r"--([a-z-]+)=(\S+)", self.arguments))


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            values.update(re.findall(r'(\w+)=("[^"]*"|\S+)', instruction.arguments))
        return {k: v.strip('"') for k, v in values.items()}

    def copy_sources(self) -> list[str]:
        """Paths a COPY takes from the main build context (not ``--from`` a stage)."""
        sources = []
        for instruction in self.all("COPY"):
            if "from" in instruction.flags():
                continue
            words = [w for w in shlex.split(instruction.arguments) if not w.startswith("--")]
            sources += words[:-1]
        return sources


@dataclass
class Dockerfile:
    path: Path
    syntax: str
    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def resolve(self, text: str) -> str:
        """``${ARG}`` / ``$ARG`` replaced by the global ARG defaults."""
        return re.sub(r"\$\{?(\w+)\}?", lambda m: self.global_args.get(m.group(1), m.group(0)),
                      text)

    def ignore_file(self) -> Path:
        return self.path.with_name(self.path.name + ".dockerignore")


def _logical_lines(text: str) -> list[tuple[str, str]]:
    """(line, heredoc body) pairs: comments and blank lines dropped, continuations joined."""
    raw = text.splitlines()
    lines: list[tuple[str, str]] = []
    index = 0
    while index < len(raw):
        line = raw[index]
        index += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\") and index < len(raw):
            following = raw[index]
            index += 1
            if following.lstrip().startswith("#"):
                continue  # comments inside a continued instruction are dropped by Docker too
            line = line[:-1].rstrip() + " " + following.strip()
        body = ""
        heredoc = re.search(r"<<-?'?\"?(\w+)'?\"?\s*$", line)
        if heredoc:
            end = heredoc.group(1)
            collected = []
            while index < len(raw) and raw[index].strip() != end:
                collected.append(raw[index])
                index += 1
            index += 1  # the terminator
            body = "\n".join(collected)
        lines.append((line, body))
    return lines


def parse(path: Path) -> Dockerfile:
    text = path.read_text()
    first = text.splitlines()[0] if text else ""
    syntax = first.removeprefix("# syntax=") if first.startswith("# syntax=") else ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, body in _logical_lines(text):
        keyword, _, arguments = line.strip().partition(" ")
        instruction = Instruction(keyword.upper(), arguments.strip(), body)
        if instruction.keyword == "FROM":
            words = instruction.arguments.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(words[0], name))
        elif not stages:
            if instruction.keyword == "ARG":
                arg_name, _, default = instruction.arguments.partition("=")
                global_args[arg_name] = default.strip('"')
        else:
            stages[-1].instructions.append(instruction)
    return Dockerfile(path, syntax, global_args, stages)


def allowed_by(ignore_file: Path, path: str) -> bool:
    """Whether a context path gets into the build context under an allow-list ignore file
    (``*`` first, then ``!pattern`` lines letting paths back in; later lines win)."""
    allowed = True
    candidate = path.rstrip("/")
    for line in ignore_file.read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        parts = candidate.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            allowed = negated
    return allowed
