"""YAML read with the line of every key and list item, so that config errors can name their line.

Duplicate keys, anchors, aliases and merge keys are refused: a config is read as written.
"""

from __future__ import annotations

from typing import Any

import yaml

from bread_ray.config_errors import ConfigError, Path_, Problem


def parse_yaml(text: str, filename: str) -> tuple[Any, dict[Path_, int]]:
    """Parse YAML, returning the data and the 1-based line of every key and list item.

    Duplicate keys are an error (PyYAML would silently keep the last one).
    """
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is not None:
            reject_aliases(root, filename)
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark else None
        reason = error.problem or error.context or "invalid YAML"
        raise ConfigError(filename, [Problem((), f"invalid YAML: {reason}", line)]) from None
    finally:
        loader.dispose()

    lines: dict[Path_, int] = {}
    problems: list[Problem] = []

    def walk(node: yaml.Node, path: Path_) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, value_node in node.value:
                key = key_node.value
                line = key_node.start_mark.line + 1
                if key in seen:
                    problems.append(Problem(path + (key,), f"duplicate key (first at line {seen[key]})", line))
                    continue
                seen[key] = line
                lines[path + (key,)] = line
                walk(value_node, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                lines[path + (index,)] = item.start_mark.line + 1
                walk(item, path + (index,))

    if root is not None:
        lines[()] = root.start_mark.line + 1
        walk(root, ())
    if problems:
        raise ConfigError(filename, problems, lines)
    return data, lines


def reject_aliases(root: yaml.Node, filename: str) -> None:
    """Anchors, aliases and merge keys (`<<`) are refused: a config is read as written, line by line,
    and an alias can expand without bound."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            problem = Problem((), "YAML anchors and aliases (&name, *name) are not supported: write the value out", node.start_mark.line + 1)
            raise ConfigError(filename, [problem])
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.tag == "tag:yaml.org,2002:merge":
                    problem = Problem((), "YAML merge keys (<<) are not supported: write the keys out", key.start_mark.line + 1)
                    raise ConfigError(filename, [problem])
                stack.extend((key, value))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def decode_config(data: bytes, filename: str) -> str:
    """input.yml bytes as text; anything but UTF-8 is a config error, not a traceback."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ConfigError(filename, [Problem((), "not UTF-8 text", line)]) from None
