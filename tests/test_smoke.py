from __future__ import annotations

from conftest import RunningServer


def test_track_round_trip(server: RunningServer) -> None:
    body = {
        "userId": "u1",
        "event": "Signed Up",
        "messageId": "m-1",
        "properties": {"big": 123456789012345678901234567890, "name": "Zoë 😀"},
    }
    response = server.post("/v1/track", body)
    assert response.status_code == 200
    assert response.json() == {"success": True}
    [row] = server.events()
    assert row["message_id"] == "m-1"
    assert row["event"] == "Signed Up"
    assert row["properties"] == '{"big":123456789012345678901234567890,"name":"Zoë 😀"}'
