"""Response classification (pure): what counts against an endpoint."""

import pytest

from nodeagent.proxy.classify import GRPC_SERVER_ERRORS, failed, grpc_status


def test_http_statuses_fail_only_from_500():
    assert [status for status in range(100, 600) if failed(status)] == list(range(500, 600))


def test_no_response_is_a_failure():
    assert failed(None) and failed(None, 0)


def test_grpc_codes_that_mean_the_server_failed():
    assert [code for code in range(17) if failed(200, code)] == [2, 13, 14, 15]
    assert all(failed(503, code) for code in range(17))  # an HTTP failure stays one whatever the trailers say


def test_grpc_server_errors_are_unknown_internal_unavailable_data_loss():
    assert GRPC_SERVER_ERRORS == {2, 13, 14, 15}


@pytest.mark.parametrize("headers,expected", [
    (None, None),
    ([], None),
    ([(b"grpc-status", b"0")], 0),
    ([(b"x", b"y"), (b"grpc-status", b"14"), (b"grpc-message", b"down")], 14),
    ([(b"grpc-status", b"fourteen")], None),
    ([(b"grpc-status", b"")], None),
    ([(b"grpc-status", b"-1")], None),
])
def test_grpc_status_is_read_from_header_pairs(headers, expected):
    assert grpc_status(headers) == expected
