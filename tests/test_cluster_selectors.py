"""Label and field selectors of the embedded cluster (apimachinery grammar and messages)."""

from __future__ import annotations

import json

import pytest

from kuberun_trio.cluster import status
from kuberun_trio.cluster.selectors import (
    EVENT_FIELDS,
    POD_FIELDS,
    event_fields,
    parse_field_selector,
    parse_label_selector,
    pod_fields,
)

LABELS = {"app": "web", "tier": "front", "env": "", "n": "7", "example.com/team": "a"}


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("", True),
        ("app=web", True),
        ("app==web", True),
        ("app=db", False),
        ("app!=db", True),
        ("app!=web", False),
        ("missing!=x", True),
        ("app in (web,db)", True),
        ("app in (db)", False),
        ("app notin (db)", True),
        ("app notin (web, db)", False),
        ("missing notin (x)", True),
        ("missing in (x)", False),
        ("app", True),
        ("missing", False),
        ("!missing", True),
        ("!app", False),
        ("app=web,tier=front", True),
        ("app=web,tier=back", False),
        ("  app = web ,  tier in ( front ) ", True),
        ("env=", True),
        ("env==", True),
        ("app==", False),
        ("env in ()", True),
        ("env in (,x)", True),
        ("n>5", True),
        ("n<5", False),
        ("n>7", False),
        ("app>1", False),
        ("example.com/team=a", True),
        ("x in (in,notin)", False),
        ("app in (in, web)", True),
    ],
)
def test_label_selector_matches(selector: str, expected: bool) -> None:
    assert parse_label_selector(selector).matches(LABELS) is expected


def test_label_selector_requirements_are_sorted_and_typed() -> None:
    sel = parse_label_selector("z=1,a in (y,x),!m")
    assert [(r.key, r.operator, r.values) for r in sel.requirements] == [
        ("a", "in", ("x", "y")),
        ("m", "!", ()),
        ("z", "=", ("1",)),
    ]
    assert sel.matches(None) is False
    assert parse_label_selector("!a").matches(None) is True


def _bad(text: str) -> str:
    with pytest.raises(status.ApiStatusError) as info:
        parse_label_selector(text)
    assert info.value.code == 400
    body = json.loads(info.value.body)
    assert body["reason"] == "BadRequest"
    assert "details" not in body
    message: str = body["message"]
    return message


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        ("app in (x", "unable to parse requirement: found '', expected: ',' or ')'"),
        ("app in x", "unable to parse requirement: found 'x' expected: '('"),
        ("app=web,", "found '', expected: identifier after ','"),
        ("app=web tier=x", "found 'tier', expected: ',' or 'end of string'"),
        ("=web", "found '=', expected: !, identifier, or 'end of string'"),
        ("app=(", "unable to parse requirement: found '(', expected: identifier"),
        ("!app=x", "found '=', expected: ',' or 'end of string'"),
        (
            "app foo",
            "unable to parse requirement: found 'foo', expected: in, notin, =, ==, !=, gt, lt",
        ),
        ("n>x", "for 'Gt', 'Lt' operators, the value must be an integer"),
    ],
)
def test_label_selector_syntax_errors(selector: str, message: str) -> None:
    got = _bad(selector)
    if message.startswith(("unable", "found")):
        assert got == message
    else:
        assert message in got


def test_label_selector_validates_keys_and_values() -> None:
    got = _bad("a@b=1")
    assert got.startswith('unable to parse requirement: <nil>: Invalid value: "a@b": name part ')
    got = _bad("a=b@c")
    assert got.startswith('unable to parse requirement: values[0][a]: Invalid value: "b@c": ')
    assert "a valid label must be an empty string" in got
    assert "name part must be no more than 63 characters" in _bad("k" * 64)


POD = {
    "metadata": {"name": "p", "namespace": "ns"},
    "spec": {"nodeName": "n1", "restartPolicy": "Never", "serviceAccountName": "default"},
    "status": {"phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}]},
}


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("", True),
        ("metadata.name=p", True),
        ("metadata.name==p", True),
        ("metadata.name!=p", False),
        ("metadata.namespace=ns,status.phase=Running", True),
        ("status.phase=Pending", False),
        ("spec.nodeName=n1", True),
        ("spec.host=n1", True),
        ("spec.nodeName=", False),
        ("spec.hostNetwork=false", True),
        ("spec.restartPolicy=Never", True),
        ("status.podIP=10.0.0.1", True),
        ("status.nominatedNodeName=", True),
    ],
)
def test_pod_field_selector(selector: str, expected: bool) -> None:
    sel = parse_field_selector(selector, POD_FIELDS)
    assert sel.matches(pod_fields(POD)) is expected


def test_unsupported_field_is_400() -> None:
    with pytest.raises(status.ApiStatusError) as info:
        parse_field_selector("metadata.name=p,spec.foo=1", POD_FIELDS)
    assert info.value.code == 400
    assert json.loads(info.value.body)["message"] == "field label not supported: spec.foo"


def test_field_selector_syntax_error_and_escapes() -> None:
    with pytest.raises(status.ApiStatusError) as info:
        parse_field_selector("metadata.name", POD_FIELDS)
    assert json.loads(info.value.body)["message"] == (
        "invalid selector: 'metadata.name'; can't understand 'metadata.name'"
    )
    sel = parse_field_selector(r"metadata.name=a\,b", POD_FIELDS)
    assert [(r.field, r.value) for r in sel.requirements] == [("metadata.name", "a,b")]


def test_event_fields_as_kubectl_describe_asks() -> None:
    event = {
        "metadata": {"name": "p.1", "namespace": "ns"},
        "involvedObject": {"kind": "Pod", "namespace": "ns", "name": "p", "uid": "u1"},
        "reason": "Scheduled",
        "source": {"component": "default-scheduler"},
        "type": "Normal",
    }
    text = (
        "involvedObject.name=p,involvedObject.namespace=ns,"
        "involvedObject.kind=Pod,involvedObject.uid=u1"
    )
    assert parse_field_selector(text, EVENT_FIELDS).matches(event_fields(event))
    other = parse_field_selector("involvedObject.uid=u2", EVENT_FIELDS)
    assert not other.matches(event_fields(event))
    assert parse_field_selector("source=default-scheduler,type=Normal", EVENT_FIELDS).matches(
        event_fields(event)
    )
    with pytest.raises(status.ApiStatusError):
        parse_field_selector("spec.nodeName=x", EVENT_FIELDS)
