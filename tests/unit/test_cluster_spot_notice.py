"""Spot notice parsing (deadline, malformed bodies, 404) and the IMDSv2/IMDSv1 client, against a fake IMDS."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from cluster.fake_imds import TOKEN_PATH, FakeInstanceMetadata
from cluster.spot_notice import (
    DEFAULT_DEADLINE_S,
    InstanceMetadataClient,
    NoticeError,
    parse_instance_action,
)

NOW = datetime(2026, 11, 21, 11, 58, 30, tzinfo=timezone.utc).timestamp()


def test_404_means_no_notice():
    assert parse_instance_action(404, b"Not Found") is None


def test_notice_deadline_is_seconds_until_its_time():
    notice = parse_instance_action(200, b'{"action": "terminate", "time": "2026-11-21T12:00:00Z"}')
    assert notice.action == "terminate"
    assert notice.time == datetime(2026, 11, 21, 12, 0, 0, tzinfo=timezone.utc)
    assert notice.deadline_s(now=NOW) == pytest.approx(90.0)
    assert "terminate at 2026-11-21T12:00:00Z" in notice.describe()


@pytest.mark.parametrize(
    "time_text", ["2026-11-21T12:00:00+00:00", "2026-11-21T13:00:00+01:00", "2026-11-21T12:00:00"]
)
def test_offsets_and_naive_times_are_utc(time_text):
    notice = parse_instance_action(200, f'{{"action": "stop", "time": "{time_text}"}}')
    assert notice.deadline_s(now=NOW) == pytest.approx(90.0)
    assert notice.describe() == "spot interruption notice: stop at 2026-11-21T12:00:00Z"


def test_a_notice_in_the_past_leaves_no_time():
    notice = parse_instance_action(200, '{"action": "terminate", "time": "2026-11-21T11:00:00Z"}')
    assert notice.deadline_s(now=NOW) == 0.0


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[1, 2]", b"", b'{"action": "terminate"}', b'{"action": "terminate", "time": "soon"}'],
)
def test_malformed_notice_still_counts_with_the_default_deadline(body):
    notice = parse_instance_action(200, body)
    assert notice is not None, "a 200 from instance-action is a notice even when unreadable"
    assert notice.time is None
    assert notice.deadline_s(now=NOW) == DEFAULT_DEADLINE_S
    assert notice.deadline_s(now=NOW, default_s=25.0) == 25.0


def test_action_is_kept_when_only_the_time_is_bad():
    assert parse_instance_action(200, b'{"action": "hibernate", "time": 5}').action == "hibernate"


@pytest.mark.parametrize("status", [401, 403, 500, 503])
def test_other_statuses_are_errors_not_notices(status):
    with pytest.raises(NoticeError, match=str(status)):
        parse_instance_action(status, b"")


def test_client_uses_imdsv2_token_and_reuses_it():
    with FakeInstanceMetadata(require_token=True) as imds:
        client = InstanceMetadataClient(imds.url)
        assert client.notice() is None
        assert client.notice() is None
        when = imds.set_notice(deadline_s=60)
        notice = client.notice()
    assert notice.time == when
    puts = [r for r in imds.requests if r.method == "PUT" and r.path == TOKEN_PATH]
    assert len(puts) == 1, "the session token is fetched once and reused"
    assert [r.token for r in imds.notice_gets()] == ["token-0"] * 3


def test_client_falls_back_to_imdsv1_when_the_token_call_fails():
    with FakeInstanceMetadata(imdsv2=False) as imds:
        client = InstanceMetadataClient(imds.url)
        assert client.notice() is None
        imds.set_body('{"action": "terminate", "time": "2026-11-21T12:00:00Z"}')
        assert client.notice().action == "terminate"
    assert all(r.token is None for r in imds.notice_gets())
    assert len([r for r in imds.requests if r.method == "PUT"]) == 1, "no token retry on every poll"


def test_client_fetches_a_new_token_after_a_401():
    with FakeInstanceMetadata(require_token=True) as imds:
        client = InstanceMetadataClient(imds.url)
        assert client.notice() is None
        imds.tokens.clear()  # the service forgot the token (expired)
        assert client.notice() is None
    assert [r.status for r in imds.notice_gets()] == [404, 401, 404]


def test_unreachable_endpoint_is_an_error():
    with FakeInstanceMetadata() as imds:
        url = imds.url
    with pytest.raises(NoticeError, match="cannot reach"):
        InstanceMetadataClient(url, timeout_s=0.5).notice()
