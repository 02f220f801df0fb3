"""The sans-IO limit decisions of ``kuberun_trio.core.limits``, driven synchronously."""

from __future__ import annotations

import logging

import pytest

from kuberun_trio.core.limits import (
    Admission,
    Limits,
    MaxStartups,
    Refusal,
    SignalBucket,
    Ticket,
    report_refusal,
)


def admit(admission: Admission, address: str = "10.0.0.1", fds: int | None = None) -> Ticket:
    ticket = admission.accept(address, fds)
    assert isinstance(ticket, Ticket), ticket
    return ticket


@pytest.mark.parametrize(("text", "expected"), [
    ("10:30:100", MaxStartups(10, 30, 100)),
    ("5", MaxStartups(5, 100, 5)),
    (7, MaxStartups(7, 100, 7)),
    (" 3:50:9 ", MaxStartups(3, 50, 9)),
])
def test_max_startups_parse(text: object, expected: MaxStartups) -> None:
    assert MaxStartups.parse(text) == expected


@pytest.mark.parametrize("text", ["", "10:30", "a:b:c", "10:0:100", "10:101:100", "20:30:10",
                                  "0:30:10", 1.5, None, True])
def test_max_startups_refused(text: object) -> None:
    with pytest.raises(ValueError, match="start"):
        MaxStartups.parse(text)


def test_max_startups_drop_probability_is_openssh_s() -> None:
    m = MaxStartups(10, 30, 100)
    assert [m.drop_probability(n) for n in (0, 9)] == [0.0, 0.0]
    assert m.drop_probability(10) == pytest.approx(0.30)
    assert m.drop_probability(55) == pytest.approx(0.65)  # halfway: 30 + 70/2
    assert m.drop_probability(99) == pytest.approx(0.30 + 0.70 * 89 / 90)
    assert m.drop_probability(100) == 1.0
    assert m.drop_probability(150) == 1.0


def test_random_early_drop_uses_the_random_number() -> None:
    draws = iter([0.29, 0.31])
    admission = Admission(Limits(max_startups=MaxStartups(2, 30, 100),
                                 max_startups_per_address=100), random=lambda: next(draws))
    admit(admission, "a")
    admit(admission, "b")
    dropped = admission.accept("c")  # 2 unauthenticated: 30 % chance, draw 0.29 < 0.30
    assert isinstance(dropped, Refusal) and dropped.reason == "max-startups"
    admit(admission, "c")  # draw 0.31: kept
    assert admission.unauthenticated == 3


def test_full_drops_everything_and_authentication_makes_room() -> None:
    admission = Admission(Limits(max_startups=MaxStartups.parse("2"),
                                 max_startups_per_address=100), random=lambda: 0.999)
    first, second = admit(admission, "a"), admit(admission, "b")
    assert isinstance(admission.accept("c"), Refusal)
    assert first.authenticated("alice") is None  # no longer counts as unauthenticated
    third = admit(admission, "c")
    assert isinstance(admission.accept("d"), Refusal)
    second.release()
    admit(admission, "d")
    third.release()
    assert (admission.connections, admission.unauthenticated) == (2, 1)


def test_per_address_cap_counts_only_unauthenticated() -> None:
    admission = Admission(Limits(max_startups_per_address=2), random=lambda: 1.0)
    one, two = admit(admission), admit(admission)
    refusal = admission.accept("10.0.0.1")
    assert isinstance(refusal, Refusal) and refusal.reason == "max-startups-per-address"
    assert "(limit 2)" in refusal.message
    admit(admission, "10.0.0.2")  # another address is not affected
    assert one.authenticated("alice") is None
    admit(admission)  # one of the address's two logged in: room for another
    two.release()
    two.release()  # idempotent
    assert admission.unauthenticated_by_address["10.0.0.1"] == 1


def test_max_connections_counts_every_connection() -> None:
    admission = Admission(Limits(max_connections=2), random=lambda: 1.0)
    a, _b = admit(admission, "a"), admit(admission, "b")
    a.authenticated("alice")
    refusal = admission.accept("c")
    assert isinstance(refusal, Refusal) and refusal.reason == "max-connections"
    a.release()
    admit(admission, "c")


def test_connections_per_user() -> None:
    admission = Admission(Limits(max_connections_per_user=2), random=lambda: 1.0)
    tickets = [admit(admission, f"10.0.0.{i}") for i in range(4)]
    assert tickets[0].authenticated("alice") is None
    assert tickets[1].authenticated("alice") is None
    refusal = tickets[2].authenticated("alice")
    assert refusal is not None and refusal.reason == "max-connections-per-user"
    assert refusal.message == "too many connections for user 'alice' (limit 2)"
    assert tickets[3].authenticated("bob") is None
    tickets[2].release()  # a refused ticket still gives back its connection
    tickets[0].release()
    assert admission.by_user == {"alice": 1, "bob": 1}
    assert admission.connections == 2 and admission.unauthenticated == 0
    assert admit(admission).authenticated("alice") is None


def test_max_sessions_per_connection() -> None:
    admission = Admission(Limits(max_sessions=2), random=lambda: 1.0)
    ticket = admit(admission)
    ticket.authenticated("alice")
    assert ticket.open_session() is None
    assert ticket.open_session() is None
    refusal = ticket.open_session()
    assert refusal == Refusal("max-sessions", "too many sessions on this connection (limit 2)",
                              "session")
    ticket.close_session()
    assert ticket.open_session() is None
    other = admit(admission)
    other.authenticated("alice")
    assert other.open_session() is None  # per connection, not per user


def test_fd_reserve_refuses_new_connections() -> None:
    admission = Admission(Limits(fd_reserve=10), fd_limit=100, fds_at_start=20)
    admit(admission, fds=89)  # 11 free
    admit(admission, "b", fds=90)  # 10 free
    refusal = admission.accept("c", 91)
    assert isinstance(refusal, Refusal) and refusal.reason == "fd-reserve"


def test_one_user_cannot_take_more_than_half_of_the_fds() -> None:
    # 200 fds, 40 in use at start, 60 reserved: 100 to share, at most 50 per user.
    limits = Limits(fd_reserve=60, max_sessions=100, max_connections_per_user=100,
                    max_startups_per_address=100)
    admission = Admission(limits, fd_limit=200, fds_at_start=40, random=lambda: 1.0)
    assert admission.fd_share() == 50
    mallory = [admit(admission) for _ in range(5)]
    for ticket in mallory:
        assert ticket.authenticated("mallory") is None
    opened = sum(ticket.open_session() is None for ticket in mallory for _ in range(20))
    assert opened == 45  # 5 connections + 45 sessions = 50 fds
    alice = admit(admission, "10.9.9.9")
    assert alice.authenticated("alice") is None
    assert alice.open_session() is None
    late = admit(admission)
    refusal = late.authenticated("mallory")
    assert refusal is not None and refusal.reason == "fd-share"
    mallory[0].release()
    assert admission.units_by_user["mallory"] == 50 - 1 - 20  # its connection and 20 sessions


def test_unauthenticated_connections_share_half_of_the_fds() -> None:
    limits = Limits(fd_reserve=0, max_startups=MaxStartups(1000, 100, 1000),
                    max_startups_per_address=1000)
    admission = Admission(limits, fd_limit=30, fds_at_start=10)
    for _ in range(10):
        admit(admission)
    refusal = admission.accept("10.0.0.1")
    assert isinstance(refusal, Refusal) and refusal.reason == "fd-reserve"


def test_no_fd_budget_without_a_limit() -> None:
    admission = Admission(Limits(max_sessions=1000), random=lambda: 1.0)
    assert admission.fd_share() is None
    ticket = admit(admission)
    ticket.authenticated("alice")
    assert all(ticket.open_session() is None for _ in range(1000))


def test_signal_bucket_refuses_the_excess_without_queueing() -> None:
    bucket = SignalBucket(2.0)
    assert [bucket.take(0.0) is None for _ in range(4)] == [True, True, False, False]
    assert bucket.take(0.4) is not None  # 0.8 tokens refilled: not a whole one
    assert bucket.take(0.5) is None  # refusals cost nothing: 1.0 token at 0.5 s
    refusal = bucket.take(0.55)
    assert refusal is not None and refusal.reason == "signal-rate" and refusal.scope == "signal"
    assert refusal.message == "too many signals (limit 2 per second)"
    assert bucket.take(5.0) is None and bucket.take(5.0) is None  # the burst is capped at 2
    assert bucket.take(5.0) is not None


def test_keepalive_ends_a_silent_client_after_interval_times_count() -> None:
    interval, count = Limits(client_alive_interval=15, client_alive_count_max=3).keepalive()
    assert (interval, count) == (11.25, 3)
    assert interval * (count + 1) == 45  # asyncssh closes at the (count + 1)-th interval


def test_report_refusal_logs_event_and_reason(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "kuberun_trio.core.limits"):
        report_refusal(Refusal("max-sessions", "too many", "session"), connection_id="c1",
                       client="1.2.3.4:5")
    (record,) = caplog.records
    assert (record.event, record.reason, record.scope, record.connection_id) == (  # type: ignore[attr-defined]
        "limit-refused", "max-sessions", "session", "c1")


def test_limits_refuse_values_out_of_range() -> None:
    for bad in ({"max_sessions": 0}, {"login_grace_time": 0.0}, {"fd_reserve": -1},
                {"max_signals_per_second": 0.0}, {"client_alive_count_max": 0}):
        with pytest.raises(ValueError):
            Limits(**bad)  # type: ignore[arg-type]
