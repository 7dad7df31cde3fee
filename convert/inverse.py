"""Run a conversion table backwards: jblip param path -> the PyTorch key it came from.

A `Rule(source_regex, target_template)` is inverted without extra data: the
target template (`layers_\\1/self_attn/\\2/kernel`) becomes a regex that
recovers the group values from a param path, and the source regex is written
out with those values in place of its groups (`model\\.layers\\.(\\d+)\\.` ->
`model.layers.3.`). Every inverted key is checked by running the rule forwards
again, so an inversion is either exact or refused. Alias rules (tied copies)
and dropped keys (target None) are never exported.
"""
from __future__ import annotations

import re
from typing import Iterable

from jblip.convert.rules import ConversionError, Rule

_GROUP_REF = re.compile(r"\\(\d+)")
_REGEX_SYNTAX = set(".[]|?*+{}^$)")


def _source_parts(regex: str) -> list[str | int] | None:
    """The source regex as literal text and group numbers, or None when it has syntax outside its
    groups (wildcards, classes, alternation) that no group value could fill in."""
    parts: list[str | int] = []
    literal: list[str] = []
    group, i = 0, 0
    while i < len(regex):
        c = regex[i]
        if c == "\\":
            if i + 1 == len(regex) or regex[i + 1].isalnum():  # \d, \w ... outside a group
                return None
            literal.append(regex[i + 1])
            i += 2
        elif c == "(":
            if regex.startswith("(?", i):
                return None
            depth, j = 0, i
            while j < len(regex):
                if regex[j] == "\\":
                    j += 2
                    continue
                if regex[j] == "(":
                    if depth and not regex.startswith("(?:", j):
                        return None  # nested capturing group: numbering gets ambiguous
                    depth += 1
                elif regex[j] == ")":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            if depth:
                return None
            group += 1
            parts += ["".join(literal), group]
            literal = []
            i = j + 1
        elif c in _REGEX_SYNTAX:
            return None
        else:
            literal.append(c)
            i += 1
    parts.append("".join(literal))
    return parts


def _target_regex(template: str) -> re.Pattern:
    """`layers_\\1/mlp/\\2/kernel` -> a regex whose named groups g1, g2 recover the values."""
    out, seen, pos = [], set(), 0
    for m in _GROUP_REF.finditer(template):
        out.append(re.escape(template[pos:m.start()]))
        n = m.group(1)
        out.append(f"(?P=g{n})" if n in seen else f"(?P<g{n}>[^/]+)")
        seen.add(n)
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out))


class InverseRule:
    def __init__(self, rule: Rule):
        self.rule = rule
        self.source = rule.compiled()
        self.parts = _source_parts(rule.source)
        self.target = _target_regex(rule.target)

    def key_for(self, path: str) -> str | None:
        """The source key that this rule maps to `path`, or None if it maps no key there."""
        m = self.target.fullmatch(path)
        if m is None:
            return None
        if self.parts is None:
            raise ConversionError(f"cannot invert conversion rule {self.rule.source!r} -> {self.rule.target!r} "
                                  f"for {path!r}: its source regex has syntax outside its groups")
        values = {int(k[1:]): v for k, v in m.groupdict().items()}
        try:
            key = "".join(p if isinstance(p, str) else values[p] for p in self.parts)
        except KeyError:  # a source group the target does not carry (e.g. `(encoder|decoder)`)
            return None
        forward = self.source.fullmatch(key)
        if forward is None or forward.expand(self.rule.target) != path:
            return None
        return key


class KeyInverter:
    """param path -> (torch key, rule), through the first non-alias rule that inverts exactly."""

    def __init__(self, rules: Iterable[Rule]):
        self.rules = [InverseRule(r) for r in rules if r.target is not None and not r.alias]

    def __call__(self, path: str) -> tuple[str, Rule] | None:
        for inverse in self.rules:
            key = inverse.key_for(path)
            if key is not None:
                return key, inverse.rule
        return None
