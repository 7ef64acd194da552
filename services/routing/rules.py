"""Routing rules engine: what the admin's rules say about a ticket (category, skills, tier, priority).

Plain Python; no database, no broker. Rules arrive as stored dicts (validated at write time by
``contracts.routing.RuleRequest``, plus ``id`` and ``position``); the ticket as a dict with
subject, description (None or missing when not fetched), category, channel, organization_id,
priority and tags.

Evaluation
  Rules run in (position, id) order; a rule without a position runs after those with one. Disabled
  rules are skipped. A rule matches when all (``match: "all"``, the default) or any (``"any"``) of its
  conditions hold. Every matching rule's actions apply: a later set_category / set_tier overrides an
  earlier one, require_skills accumulate (sorted union), raise_priority raises to at least that
  priority and never lowers. A matching rule with ``stop`` ends the evaluation after its actions.
  Conditions see the effects of earlier matching rules on category and priority, so one rule can
  categorise by keywords and a later one route on that category.

Conditions
  A field with no value (None, missing, no tags) satisfies no condition, whatever the operator.

  contains_any / contains_all on text (subject, description, category, organization): keywords
    matched as whole words, case- and accent-insensitive (casefold, Unicode NFKD, combining marks
    dropped: "Contraseña" matches "contrasena"). Text and keyword are cut into tokens: runs of
    letters, digits and underscore, and every other non-space character as a token of its own. A
    keyword matches where its tokens appear consecutively in the text's: "password" does not match
    "passwords" nor "password123" but does match "password." and "(password)"; "reset password"
    matches "Reset  PASSWORD" but not "reset-password" or "reset my password"; "c++" matches
    "C++ compiler" but not "vitamin c". A keyword with no token (only spaces) matches nothing.
    Scripts written without spaces (Chinese, Japanese) match whole runs only.
  equals / in on subject, description, category: equality after Unicode NFC and casefold (accents
    count: "facturación" does not equal "facturacion"). On channel, priority, organization: exact.
  matches: a regular expression (the third-party ``regex`` package in its re-compatible V0 mode,
    case-insensitive) searched anywhere in the NFC-normalised original text, not the folded one.
    Each search is limited to ``regex_timeout`` seconds; a timeout, or a pattern that does not
    compile, counts as no match and is logged once per rule and pattern.
  tags (ticket tags are lowercase; the rule's values are stripped and lowercased before comparing):
    contains_any / in: at least one of the values is a tag of the ticket; contains_all: every one
    is; equals: that tag is present; matches: the pattern is found in at least one tag.
"""
from __future__ import annotations

import functools
import logging
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

import regex

from contracts.tickets import PRIORITIES

log = logging.getLogger(__name__)

# per search; an admin-written pattern that backtracks catastrophically costs at most this
REGEX_TIMEOUT_SECONDS = 0.05
_REGEX_FLAGS = regex.V0 | regex.IGNORECASE

# low=0 .. critical=3
PRIORITY_RANK = {name: rank for rank, name in enumerate(reversed(PRIORITIES))}

TEXT_FIELDS = frozenset({"subject", "description", "category"})
# where a rule's field is not the ticket's key
_TICKET_KEYS = {"organization": "organization_id"}

_TOKEN = re.compile(r"\w+|[^\w\s]")
_WARNED_LIMIT = 10_000
_warned: set[tuple[str, str, str]] = set()


@dataclass(frozen=True)
class RuleOutcome:
    category: str | None = None  # None: leave the ticket's category as it is
    required_skills: tuple[str, ...] = ()  # sorted union of the matching rules' require_skills
    tier: str | None = None  # None: no rule picked one (the service's default applies)
    priority: str | None = None  # set only when higher than the ticket's priority
    matched_rule_ids: tuple[str, ...] = ()  # in evaluation order


def evaluate(rules: list[dict], ticket: dict, *, regex_timeout: float = REGEX_TIMEOUT_SECONDS) -> RuleOutcome:
    """Run ``rules`` against ``ticket``; see the module docstring for the semantics."""
    facts = _Facts(ticket)
    rank, priority = _rank(ticket.get("priority")), None
    category = tier = None
    skills: set[str] = set()
    matched: list[str] = []
    for rule in sorted(rules, key=_order):
        if not rule.get("enabled", True) or not _rule_matches(rule, facts, regex_timeout):
            continue
        matched.append(str(rule.get("id", "")))
        actions = rule.get("actions") or {}
        if actions.get("set_category") is not None:
            category = actions["set_category"]
            facts.assign("category", category)
        if actions.get("set_tier") is not None:
            tier = actions["set_tier"]
        skills.update(actions.get("require_skills") or ())
        raise_to = actions.get("raise_priority")
        if raise_to is not None and _rank(raise_to) > rank:
            rank, priority = _rank(raise_to), raise_to
            facts.assign("priority", raise_to)
        if rule.get("stop"):
            break
    return RuleOutcome(category=category, required_skills=tuple(sorted(skills)), tier=tier,
                       priority=priority, matched_rule_ids=tuple(matched))


def uses_description(rules: list[dict]) -> bool:
    """Whether evaluating ``rules`` needs the ticket's description (events do not carry it)."""
    return any(condition.get("field") == "description"
               for rule in rules if rule.get("enabled", True)
               for condition in rule.get("conditions") or ())


def fold(text: str) -> str:
    """Case- and accent-insensitive form: casefold, NFKD, combining marks dropped."""
    folded = text.casefold()
    if folded.isascii():
        return folded
    decomposed = unicodedata.normalize("NFKD", folded)
    # casefold again: compatibility forms such as U+210C decompose to capitals
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()


# --- internals --------------------------------------------------------------------------------

def _rank(priority: Any) -> int:
    # a ticket without a known priority ranks below low: any raise_priority applies
    return PRIORITY_RANK.get(priority, -1)


def _order(rule: dict) -> tuple:
    position = rule.get("position")
    return (position is None, position if position is not None else 0, str(rule.get("id", "")))


def _rule_matches(rule: dict, facts: _Facts, timeout: float) -> bool:
    conditions = rule.get("conditions")
    if not conditions:
        return False
    if rule.get("match") == "any":
        for condition in conditions:
            if _condition_holds(condition, facts, rule, timeout):
                return True
        return False
    for condition in conditions:
        if not _condition_holds(condition, facts, rule, timeout):
            return False
    return True


def _condition_holds(condition: dict, facts: _Facts, rule: dict, timeout: float) -> bool:
    field, operator, value = condition.get("field"), condition.get("operator"), condition.get("value")
    if field == "tags":
        return _tags_condition(operator, value, facts, rule, timeout)
    raw = facts.raw(field)
    if raw is None:
        return False
    if operator == "contains_any":
        tokens = facts.tokens(field)
        return any(_has_keyword(tokens, keyword) for keyword in _keywords(_values(value)))
    if operator == "contains_all":
        values = _values(value)
        keywords = _keywords(values)
        # a keyword with no token matches nothing, so neither does a contains_all holding one
        if not keywords or len(keywords) != len(values):
            return False
        tokens = facts.tokens(field)
        return all(_has_keyword(tokens, keyword) for keyword in keywords)
    if operator == "equals":
        if field in TEXT_FIELDS:
            return isinstance(value, str) and facts.caseless(field) in _caseless_set((value,))
        return raw == value
    if operator == "in":
        if field in TEXT_FIELDS:
            return facts.caseless(field) in _caseless_set(_values(value))
        return raw in _values(value)
    if operator == "matches":
        return _search(value, facts.nfc(field), rule, timeout)
    _warn_once(rule, "operator", f"{field} {operator}")
    return False


def _tags_condition(operator: str, value: Any, facts: _Facts, rule: dict, timeout: float) -> bool:
    tags = facts.tags()
    if not tags:
        return False
    if operator in ("contains_any", "in"):
        return not tags.isdisjoint(_tag_set(_values(value)))
    if operator == "contains_all":
        wanted = _tag_set(_values(value))
        return bool(wanted) and wanted <= tags
    if operator == "equals":
        return isinstance(value, str) and value.strip().lower() in tags
    if operator == "matches":
        return any(_search(value, tag, rule, timeout) for tag in sorted(tags))
    _warn_once(rule, "operator", f"tags {operator}")
    return False


def _values(value: Any) -> tuple[str, ...]:
    if type(value) is list:  # what validated rules hold: the fast path
        values = tuple(value)
        for item in values:
            if type(item) is not str:
                return tuple(item for item in values if isinstance(item, str))
        return values
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(item for item in value if isinstance(item, str))
    return ()


class _Tokens:
    """A text cut into tokens once: a set for one-token keywords, a padded string for phrases."""
    __slots__ = ("single", "padded")

    def __init__(self, text: str):
        tokens = _TOKEN.findall(fold(text))
        self.single = frozenset(tokens)
        self.padded = " " + " ".join(tokens) + " "


def _has_keyword(tokens: _Tokens, keyword: tuple[bool, str]) -> bool:
    is_phrase, key = keyword
    return key in tokens.padded if is_phrase else key in tokens.single


@functools.lru_cache(maxsize=4096)
def _keywords(values: tuple[str, ...]) -> tuple[tuple[bool, str], ...]:
    """The keywords that can match, as (is_phrase, key); keywords with no token are dropped."""
    keywords = []
    for value in values:
        tokens = _TOKEN.findall(fold(value))
        if len(tokens) == 1:
            keywords.append((False, tokens[0]))
        elif tokens:
            keywords.append((True, " " + " ".join(tokens) + " "))
    return tuple(keywords)


def _caseless(text: str) -> str:
    return unicodedata.normalize("NFC", text).casefold()


@functools.lru_cache(maxsize=4096)
def _caseless_set(values: tuple[str, ...]) -> frozenset[str]:
    return frozenset(_caseless(value) for value in values)


@functools.lru_cache(maxsize=4096)
def _tag_set(values: tuple[str, ...]) -> frozenset[str]:
    return frozenset(value.strip().lower() for value in values)


@functools.lru_cache(maxsize=1024)
def _compile(pattern: str):
    """The compiled pattern, or None when ``regex`` refuses it (logged once, here, by the cache)."""
    try:
        return regex.compile(pattern, _REGEX_FLAGS)
    except (regex.error, ValueError, OverflowError, RecursionError) as exc:
        log.warning("routing rule pattern does not compile, treated as no match: %r: %s", pattern, exc)
        return None


def _search(pattern: Any, text: str, rule: dict, timeout: float) -> bool:
    if not isinstance(pattern, str):
        return False
    compiled = _compile(pattern)
    if compiled is None:
        return False
    try:
        return compiled.search(text, timeout=timeout) is not None
    except TimeoutError:
        _warn_once(rule, "timeout", pattern)
        return False


def _warn_once(rule: dict, what: str, detail: str) -> None:
    key = (str(rule.get("id", "")), what, detail)
    if key in _warned:
        return
    if len(_warned) >= _WARNED_LIMIT:
        _warned.clear()
    _warned.add(key)
    if what == "timeout":
        log.warning("routing rule %s: pattern %r timed out, treated as no match", key[0], detail)
    else:
        log.warning("routing rule %s: unsupported condition %r, treated as no match", key[0], detail)


class _Facts:
    """The ticket as conditions see it; each field normalised at most once per evaluation."""
    __slots__ = ("_values", "_cache")

    def __init__(self, ticket: dict):
        self._values: dict[str, Any] = {}
        for field in ("subject", "description", "category", "channel", "organization", "priority"):
            value = ticket.get(_TICKET_KEYS.get(field, field))
            self._values[field] = value if value is None or isinstance(value, str) else str(value)
        self._values["tags"] = ticket.get("tags") or ()
        self._cache: dict[tuple[str, str], Any] = {}

    def assign(self, field: str, value: str) -> None:
        self._values[field] = value
        for kind in ("tokens", "caseless", "nfc"):
            self._cache.pop((kind, field), None)

    def raw(self, field: str) -> str | None:
        return self._values.get(field)

    def tokens(self, field: str) -> _Tokens:
        key = ("tokens", field)
        if key not in self._cache:
            self._cache[key] = _Tokens(self._values[field])
        return self._cache[key]

    def caseless(self, field: str) -> str:
        key = ("caseless", field)
        if key not in self._cache:
            self._cache[key] = _caseless(self._values[field])
        return self._cache[key]

    def nfc(self, field: str) -> str:
        key = ("nfc", field)
        if key not in self._cache:
            self._cache[key] = unicodedata.normalize("NFC", self._values[field])
        return self._cache[key]

    def tags(self) -> frozenset[str]:
        key = ("tags", "tags")
        if key not in self._cache:
            self._cache[key] = frozenset(str(tag).strip().lower() for tag in self._values["tags"])
        return self._cache[key]
