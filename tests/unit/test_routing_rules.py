"""The routing rules engine (services/routing/rules.py): pure functions, no broker, no database."""
import logging
import re

import pytest
import regex
from hypothesis import HealthCheck, given, settings, strategies as st

from contracts.routing import TIERS, RuleRequest
from contracts.tickets import CHANNELS, PRIORITIES
from services.routing import rules as engine
from services.routing.rules import PRIORITY_RANK, RuleOutcome, evaluate, fold, uses_description

_ids = iter(range(1_000_000))


def rule(*conditions, match="all", position=None, enabled=True, stop=False, rule_id=None, **actions):
    """A stored rule as the service hands it over: validated by the contract, plus id and position."""
    if not actions:
        actions = {"require_skills": ["general"]}
    loaded = RuleRequest().load({"name": "r", "match": match, "enabled": enabled, "stop": stop,
                                 "conditions": list(conditions), "actions": actions})
    number = next(_ids)
    loaded["id"] = rule_id or f"rule-{number:06d}"
    loaded["position"] = number if position is None else position
    return loaded


def when(field, operator, value):
    return {"field": field, "operator": operator, "value": value}


def ticket(**fields):
    base = {"subject": "Printer on floor 3 is jammed", "description": "It beeps and shows error E-42.",
            "category": None, "channel": "web", "organization_id": "org-1", "priority": "normal",
            "tags": []}
    base.update(fields)
    return base


def matches(condition, **ticket_fields) -> bool:
    return bool(evaluate([rule(condition)], ticket(**ticket_fields)).matched_rule_ids)


# --- contains_any / contains_all on text -----------------------------------------------------

def test_contains_any_on_subject_matches_when_one_keyword_is_present():
    assert matches(when("subject", "contains_any", ["vpn", "printer"]))
    assert not matches(when("subject", "contains_any", ["vpn", "invoice"]))


@pytest.mark.parametrize("subject,keyword", [
    ("Olvidé mi Contraseña", "contrasena"),
    ("olvide mi contrasena", "CONTRASEÑA"),
    ("FACTURACIÓN duplicada", "facturacion"),
    ("Straße gesperrt", "strasse"),
    ("Ｆｕｌｌwidth ＶＰＮ down", "vpn"),
])
def test_keywords_match_regardless_of_case_and_accents(subject, keyword):
    assert matches(when("subject", "contains_any", [keyword]), subject=subject)


@pytest.mark.parametrize("subject", ["my password expired", "PASSWORD.", "(password)", "password?!",
                                     "new-password please"])
def test_keyword_matches_as_a_whole_word(subject):
    assert matches(when("subject", "contains_any", ["password"]), subject=subject)


@pytest.mark.parametrize("subject", ["passwords expired", "password123", "mypassword", "pass word",
                                     "password_reset"])
def test_keyword_does_not_match_inside_a_longer_word(subject):
    assert not matches(when("subject", "contains_any", ["password"]), subject=subject)


@pytest.mark.parametrize("subject", ["Please RESET  PASSWORD now", "reset password", "Reset\tPassword."])
def test_multi_word_keyword_matches_its_words_in_sequence(subject):
    assert matches(when("subject", "contains_any", ["reset password"]), subject=subject)


@pytest.mark.parametrize("subject", ["password reset", "reset my password", "reset-password",
                                     "resets password"])
def test_multi_word_keyword_does_not_match_other_word_sequences(subject):
    assert not matches(when("subject", "contains_any", ["reset password"]), subject=subject)


def test_keyword_with_punctuation_matches_as_written():
    condition = when("subject", "contains_any", ["c++"])
    assert matches(condition, subject="C++ compiler crashes")
    assert not matches(condition, subject="vitamin c")


def test_contains_all_needs_every_keyword_in_any_order():
    condition = when("subject", "contains_all", ["jammed", "printer"])
    assert matches(condition, subject="Printer jammed")
    assert matches(condition, subject="jammed again, the printer")
    assert not matches(condition, subject="printer offline")


def test_blank_keyword_matches_nothing_even_if_it_slipped_past_the_contract():
    def stored(condition):
        return {"id": "blank", "position": 0, "enabled": True, "match": "all", "stop": False,
                "conditions": [condition], "actions": {"set_tier": "L2"}}
    assert not evaluate([stored(when("subject", "contains_any", ["   "]))], ticket(subject="a   b")).tier
    assert not evaluate([stored(when("subject", "contains_all", ["printer", "  "]))], ticket()).tier


def test_contains_on_description_and_category_and_organization():
    assert matches(when("description", "contains_any", ["e-42"]))
    assert matches(when("description", "contains_all", ["beeps", "error"]))
    assert matches(when("category", "contains_any", ["hardware"]), category="Office hardware")
    assert matches(when("category", "contains_all", ["office", "hardware"]), category="Office Hardware")
    assert matches(when("organization", "contains_any", ["org-1"]))
    assert not matches(when("organization", "contains_any", ["org-2"]))


# --- equals / in ------------------------------------------------------------------------------

def test_equals_on_text_ignores_case_but_not_accents():
    assert matches(when("subject", "equals", "printer on FLOOR 3 is JAMMED"))
    assert not matches(when("subject", "equals", "printer"))
    assert matches(when("category", "equals", "FACTURACIÓN"), category="facturación")
    assert not matches(when("category", "equals", "facturacion"), category="facturación")
    assert matches(when("description", "equals", "it beeps and shows error e-42."))


def test_equals_on_text_treats_composed_and_decomposed_accents_alike():
    assert matches(when("category", "equals", "factura\u0301"), category="facturá")


def test_in_on_text_ignores_case():
    assert matches(when("category", "in", ["Billing", "Hardware"]), category="hardware")
    assert not matches(when("category", "in", ["Billing"]), category="hardware")
    assert matches(when("subject", "in", ["x", "PRINTER ON FLOOR 3 IS JAMMED"]))


def test_equals_and_in_on_channel_and_priority_are_exact():
    assert matches(when("channel", "equals", "web"))
    assert not matches(when("channel", "equals", "email"))
    assert matches(when("channel", "in", ["email", "web"]))
    assert not matches(when("channel", "in", ["email", "chat"]))
    assert matches(when("priority", "equals", "high"), priority="high")
    assert matches(when("priority", "in", ["high", "critical"]), priority="critical")
    assert not matches(when("priority", "in", ["high", "critical"]), priority="normal")


def test_organization_condition_reads_the_tickets_organization_id():
    assert matches(when("organization", "equals", "org-1"))
    assert not matches(when("organization", "equals", "ORG-1"))
    assert matches(when("organization", "in", ["org-9", "org-1"]))
    assert not matches(when("organization", "equals", "org-1"), organization_id=None)


# --- matches ----------------------------------------------------------------------------------

def test_matches_searches_anywhere_and_ignores_case():
    assert matches(when("subject", "matches", r"floor \d+"))
    assert matches(when("subject", "matches", r"JAMMED$"))
    assert not matches(when("subject", "matches", r"^jammed"))
    assert matches(when("description", "matches", r"error [a-z]-\d{2}"))


def test_matches_runs_on_the_original_text_not_the_accent_folded_one():
    assert matches(when("subject", "matches", r"contraseña"), subject="Mi CONTRASEÑA")
    assert not matches(when("subject", "matches", r"contrasena"), subject="Mi contraseña")
    assert matches(when("subject", "matches", "contrase\u00f1a"), subject="contrasen\u0303a")


def test_matches_on_enumerated_and_identifier_fields():
    assert matches(when("channel", "matches", r"^(web|chat)$"))
    assert matches(when("priority", "matches", r"^norm"))
    assert matches(when("category", "matches", r"bill"), category="Billing")
    assert matches(when("organization", "matches", r"^org-\d$"))


# --- tags -------------------------------------------------------------------------------------

def test_tag_conditions_compare_whole_tags():
    tags = ["vip", "spain", "q3-renewal"]
    assert matches(when("tags", "contains_any", ["VIP ", "other"]), tags=tags)
    assert not matches(when("tags", "contains_any", ["vi", "renewal"]), tags=tags)
    assert matches(when("tags", "contains_all", ["vip", "spain"]), tags=tags)
    assert not matches(when("tags", "contains_all", ["vip", "france"]), tags=tags)
    assert matches(when("tags", "equals", "Spain"), tags=tags)
    assert not matches(when("tags", "equals", "spa"), tags=tags)
    assert matches(when("tags", "in", ["france", "q3-renewal"]), tags=tags)
    assert not matches(when("tags", "in", ["france"]), tags=tags)
    assert matches(when("tags", "matches", r"^q\d-"), tags=tags)
    assert not matches(when("tags", "matches", r"^renewal"), tags=tags)


# --- fields without a value -------------------------------------------------------------------

EVERY_OPERATOR = [("contains_any", ["x"]), ("contains_all", ["x"]), ("matches", "."), ("equals", "x"),
                  ("in", ["x"])]


@pytest.mark.parametrize("operator,value", EVERY_OPERATOR)
def test_missing_description_matches_no_condition(operator, value):
    condition = when("description", operator, value)
    assert not matches(condition, description=None)
    without = ticket()
    del without["description"]
    assert not evaluate([rule(condition)], without).matched_rule_ids


@pytest.mark.parametrize("operator,value", EVERY_OPERATOR)
def test_empty_category_and_tags_match_no_condition(operator, value):
    assert not matches(when("category", operator, value), category=None)
    assert not matches(when("tags", operator, value), tags=[])


def test_uses_description_only_when_an_enabled_rule_reads_it():
    on_description = rule(when("description", "contains_any", ["vpn"]))
    on_subject = rule(when("subject", "contains_any", ["vpn"]))
    assert uses_description([on_subject, on_description])
    assert not uses_description([on_subject])
    assert not uses_description([rule(when("description", "contains_any", ["vpn"]), enabled=False)])
    assert not uses_description([])


# --- rules: match, order, enabled, stop, actions ---------------------------------------------

def test_match_all_needs_every_condition_and_match_any_one():
    conditions = (when("subject", "contains_any", ["printer"]), when("channel", "equals", "email"))
    assert not evaluate([rule(*conditions, match="all")], ticket()).matched_rule_ids
    assert evaluate([rule(*conditions, match="any")], ticket()).matched_rule_ids


def test_disabled_rule_is_skipped():
    disabled = rule(when("subject", "contains_any", ["printer"]), enabled=False, set_category="Hardware")
    assert evaluate([disabled], ticket()) == RuleOutcome()


def test_no_rules_leave_the_ticket_as_it_is():
    assert evaluate([], ticket()) == RuleOutcome(category=None, required_skills=(), tier=None, priority=None,
                                                 matched_rule_ids=())


def test_later_rule_overrides_category_and_tier_of_earlier_rule():
    printer = when("subject", "contains_any", ["printer"])
    first = rule(printer, position=1, set_category="Hardware", set_tier="L1")
    second = rule(printer, position=2, set_category="Printers", set_tier="L2")
    outcome = evaluate([second, first], ticket())
    assert (outcome.category, outcome.tier) == ("Printers", "L2")
    assert outcome.matched_rule_ids == (first["id"], second["id"])


def test_rule_without_an_action_on_a_field_keeps_the_earlier_value():
    printer = when("subject", "contains_any", ["printer"])
    outcome = evaluate([rule(printer, position=1, set_category="Hardware", set_tier="L2"),
                        rule(printer, position=2, require_skills=["printers"])], ticket())
    assert (outcome.category, outcome.tier, outcome.required_skills) == ("Hardware", "L2", ("printers",))


def test_rules_run_by_position_then_id():
    printer = when("subject", "contains_any", ["printer"])
    rules = [rule(printer, position=5, rule_id="b", set_category="B"),
             rule(printer, position=5, rule_id="a", set_category="A"),
             rule(printer, position=1, rule_id="z", set_category="Z")]
    outcome = evaluate(rules, ticket())
    assert outcome.matched_rule_ids == ("z", "a", "b")
    assert outcome.category == "B"


def test_rule_without_a_position_runs_after_positioned_ones():
    printer = when("subject", "contains_any", ["printer"])
    unpositioned = rule(printer, rule_id="a", set_category="Last")
    unpositioned["position"] = None
    outcome = evaluate([unpositioned, rule(printer, position=9, rule_id="b", set_category="First")], ticket())
    assert outcome.matched_rule_ids == ("b", "a")
    assert outcome.category == "Last"


def test_matching_stop_rule_ends_evaluation():
    printer = when("subject", "contains_any", ["printer"])
    outcome = evaluate([rule(printer, position=1, set_category="Hardware", stop=True),
                        rule(printer, position=2, set_category="Printers")], ticket())
    assert outcome.category == "Hardware"
    assert len(outcome.matched_rule_ids) == 1


def test_stop_rule_that_does_not_match_does_not_stop():
    outcome = evaluate([rule(when("subject", "contains_any", ["vpn"]), position=1, stop=True),
                        rule(when("subject", "contains_any", ["printer"]), position=2, set_category="Printers")],
                       ticket())
    assert outcome.category == "Printers"


def test_later_rule_sees_the_category_an_earlier_rule_set():
    outcome = evaluate([rule(when("subject", "contains_any", ["printer"]), position=1, set_category="Hardware"),
                        rule(when("category", "equals", "hardware"), position=2, require_skills=["hw"])],
                       ticket(category=None))
    assert outcome.required_skills == ("hw",)


def test_later_rule_sees_the_priority_an_earlier_rule_raised():
    outcome = evaluate([rule(when("tags", "equals", "vip"), position=1, raise_priority="high"),
                        rule(when("priority", "equals", "high"), position=2, set_tier="L2")],
                       ticket(tags=["vip"]))
    assert (outcome.priority, outcome.tier) == ("high", "L2")


def test_required_skills_are_the_sorted_union_of_matching_rules():
    printer = when("subject", "contains_any", ["printer"])
    outcome = evaluate([rule(printer, position=1, require_skills=["printers", "hardware"]),
                        rule(when("subject", "contains_any", ["vpn"]), position=2, require_skills=["network"]),
                        rule(printer, position=3, require_skills=["hardware", "floor-3"])], ticket())
    assert outcome.required_skills == ("floor-3", "hardware", "printers")


# --- priority ---------------------------------------------------------------------------------

def test_priority_is_raised_to_the_highest_matching_rule():
    printer = when("subject", "contains_any", ["printer"])
    outcome = evaluate([rule(printer, position=1, raise_priority="critical"),
                        rule(printer, position=2, raise_priority="high")], ticket(priority="low"))
    assert outcome.priority == "critical"


@pytest.mark.parametrize("current,raise_to", [("high", "normal"), ("critical", "low"), ("normal", "normal")])
def test_priority_is_never_lowered_nor_reported_when_not_higher(current, raise_to):
    outcome = evaluate([rule(when("subject", "contains_any", ["printer"]), raise_priority=raise_to)],
                       ticket(priority=current))
    assert outcome.priority is None
    assert outcome.matched_rule_ids


def test_ticket_without_a_known_priority_takes_the_raised_one():
    outcome = evaluate([rule(when("subject", "contains_any", ["printer"]), raise_priority="low")],
                       ticket(priority=None))
    assert outcome.priority == "low"


# --- regular expressions: timeouts and compatibility -----------------------------------------

def test_catastrophic_pattern_times_out_as_no_match_and_warns_once(caplog):
    evil = rule(when("subject", "matches", r"(a+)+$"), rule_id="evil-rule", set_category="Evil")
    victim = ticket(subject="a" * 5000 + "!")
    with caplog.at_level(logging.WARNING, logger=engine.log.name):
        first = evaluate([evil], victim, regex_timeout=0.001)
        second = evaluate([evil], victim, regex_timeout=0.001)
    assert first == second == RuleOutcome()
    warnings = [r for r in caplog.records if "timed out" in r.getMessage()]
    assert len(warnings) == 1
    assert "evil-rule" in warnings[0].getMessage()


def test_timed_out_condition_does_not_block_other_rules():
    evil = rule(when("subject", "matches", r"(a|aa)+$"), position=1, set_category="Evil")
    fine = rule(when("subject", "contains_any", ["aaa"]), position=2, set_category="Fine")
    outcome = evaluate([evil, fine], ticket(subject="aaa " + "a" * 5000 + "!"), regex_timeout=0.001)
    assert outcome.category == "Fine"


def test_pattern_the_regex_package_refuses_is_no_match():
    stored = {"id": "broken", "position": 0, "enabled": True, "match": "all", "stop": False,
              "conditions": [when("subject", "matches", "(unclosed")], "actions": {"set_tier": "L2"}}
    assert evaluate([stored], ticket()) == RuleOutcome()


@pytest.mark.filterwarnings("ignore:Possible nested set:FutureWarning")
@pytest.mark.parametrize("pattern", [
    r"INC-\d{4,}", r"^(re|fwd?):\s*", r"(?i)urgent", r"\bvpn\b", r"[[a]]", r"a{,3}", r"(?P<n>x)(?P=n)",
    r"(?<=foo)bar", r"(?<!no )refund", r"\N{LATIN SMALL LETTER N WITH TILDE}", r"(?>a+)b", r"a++b",
    r"[^\W\d_]+", r"(?x) a  b # comment", r"(?s).+", r"\Aabc\Z", r"[\u00e0-\u00ff]", r"(a)|b\1?",
])
def test_patterns_python_re_accepts_compile_with_the_regex_package(pattern):
    re.compile(pattern)
    assert engine._compile(pattern) is not None


@pytest.mark.filterwarnings("ignore:Possible nested set:FutureWarning")
def test_regex_search_matches_like_python_re_on_standard_syntax():
    samples = ["[a]", "a]", "Ñandú", "ſ", "K", "foobar", "no refund", "refund"]
    for pattern in [r"[[a]]", r"[^\W\d_]+", r"s", r"\u212a", r"(?<=foo)bar", r"(?<!no )refund"]:
        for sample in samples:
            assert (re.search(pattern, sample, re.IGNORECASE) is None) == \
                (regex.search(pattern, sample, regex.V0 | regex.IGNORECASE) is None), (pattern, sample)


def test_fold_drops_case_and_accents():
    assert fold("Contraseña ÁÉÍÓÚ Ü ç Straße") == "contrasena aeiou u c strasse"
    assert fold("plain ascii") == "plain ascii"


# --- properties -------------------------------------------------------------------------------

KEYWORDS = ["password", "reset password", "contraseña", "CONTRASENA", "factura", "VPN", "printer",
            "c++", "e-mail", "acceso denegado", "urgent", "Olvidé"]
PATTERNS = [r"INC-\d+", r"^re:", r"pass(word)?", r"\bvpn\b", r"[áé]", r"factur", r"(?i)URGENT", r"."]
TAGS = ["vip", "spain", "q3-renewal", "urgent", "billing"]
CATEGORIES = ["Billing", "Hardware", "facturación", "Access"]
ORGS = ["org-1", "org-2"]
SKILLS = ["billing", "hardware", "network", "spanish", "vip-care"]


def _text_condition(field):
    return st.one_of(
        st.builds(when, st.just(field), st.sampled_from(["contains_any", "contains_all", "in"]),
                  st.lists(st.sampled_from(KEYWORDS + CATEGORIES), min_size=1, max_size=4)),
        st.builds(when, st.just(field), st.just("equals"), st.sampled_from(KEYWORDS + CATEGORIES)),
        st.builds(when, st.just(field), st.just("matches"), st.sampled_from(PATTERNS)),
    )


def _enum_condition(field, allowed):
    return st.one_of(
        st.builds(when, st.just(field), st.just("equals"), st.sampled_from(allowed)),
        st.builds(when, st.just(field), st.just("in"), st.lists(st.sampled_from(allowed), min_size=1, max_size=3)),
        st.builds(when, st.just(field), st.just("matches"), st.sampled_from(PATTERNS)),
    )


_conditions = st.one_of(
    _text_condition("subject"), _text_condition("description"), _text_condition("category"),
    _enum_condition("organization", ORGS) | st.builds(when, st.just("organization"),
                                                      st.sampled_from(["contains_any", "contains_all"]),
                                                      st.lists(st.sampled_from(ORGS), min_size=1, max_size=2)),
    _enum_condition("channel", list(CHANNELS)), _enum_condition("priority", list(PRIORITIES)),
    st.builds(when, st.just("tags"), st.sampled_from(["contains_any", "contains_all", "in"]),
              st.lists(st.sampled_from(TAGS), min_size=1, max_size=3)),
    st.builds(when, st.just("tags"), st.just("equals"), st.sampled_from(TAGS)),
    st.builds(when, st.just("tags"), st.just("matches"), st.sampled_from(PATTERNS)),
)

_actions = st.fixed_dictionaries({}, optional={
    "set_category": st.sampled_from(CATEGORIES),
    "require_skills": st.lists(st.sampled_from(SKILLS), min_size=1, max_size=4),
    "set_tier": st.sampled_from(TIERS),
    "raise_priority": st.sampled_from(PRIORITIES),
}).filter(bool)

rule_requests = st.fixed_dictionaries(
    {"name": st.just("generated"), "conditions": st.lists(_conditions, min_size=1, max_size=4),
     "actions": _actions},
    optional={"position": st.none() | st.integers(0, 5), "enabled": st.booleans(),
              "match": st.sampled_from(["all", "any"]), "stop": st.booleans()})


@st.composite
def stored_rules(draw):
    requests = draw(st.lists(rule_requests, max_size=12))
    stored = []
    for number, request in enumerate(requests):
        loaded = RuleRequest().load(request)
        loaded["id"] = f"rule-{draw(st.integers(0, 99)):02d}-{number}"
        stored.append(loaded)
    return stored


_words = st.lists(st.sampled_from(KEYWORDS + TAGS + ["the", "my", "¿", "!", "-", "INC-123", "re:"]), max_size=8)
_text = st.one_of(_words.map(" ".join), st.text(max_size=40))

tickets = st.fixed_dictionaries(
    {"subject": _text, "category": st.none() | st.sampled_from(CATEGORIES), "channel": st.sampled_from(CHANNELS),
     "organization_id": st.sampled_from(ORGS), "priority": st.sampled_from(PRIORITIES),
     "tags": st.lists(st.sampled_from(TAGS), unique=True, max_size=4)},
    optional={"description": st.none() | _text})


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(request=rule_requests)
def test_generated_rules_pass_the_contract(request):
    RuleRequest().load(request)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(rules=stored_rules(), ticket_=tickets)
def test_evaluate_never_raises_never_lowers_priority_and_unions_matched_skills(rules, ticket_):
    outcome = evaluate(rules, ticket_)

    if outcome.priority is not None:
        assert PRIORITY_RANK[outcome.priority] > PRIORITY_RANK[ticket_["priority"]]
    by_id = {r["id"]: r for r in rules}
    matched = [by_id[rule_id] for rule_id in outcome.matched_rule_ids]
    expected_skills = sorted({skill for r in matched for skill in r["actions"].get("require_skills", ())})
    assert outcome.required_skills == tuple(expected_skills)

    assert all(r["enabled"] for r in matched)
    order = sorted(rules, key=lambda r: (r["position"] is None, r["position"] or 0, r["id"]))
    positions = [order.index(r) for r in matched]
    assert positions == sorted(positions)
    assert not any(r["stop"] for r in matched[:-1])
    raised = [r["actions"]["raise_priority"] for r in matched if "raise_priority" in r["actions"]]
    best = max(raised, key=PRIORITY_RANK.__getitem__, default=None)
    if best is not None and PRIORITY_RANK[best] > PRIORITY_RANK[ticket_["priority"]]:
        assert outcome.priority == best
    else:
        assert outcome.priority is None
    categories = [r["actions"]["set_category"] for r in matched if "set_category" in r["actions"]]
    assert outcome.category == (categories[-1] if categories else None)
    assert outcome.tier in (None, *TIERS)

