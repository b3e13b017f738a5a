from harness import Gateway


def test_publish_and_receive(gw: Gateway):
    with gw.stream("/events?topic=smoke.a") as s:
        assert s.status == 200
        assert s.headers["content-type"] == "text/event-stream; charset=utf-8"
        r = gw.publish({"topic": "smoke.a", "data": "hello\nworld", "event": "greet"})
        assert r.status == 200, r
        ids = r.json()["ids"]
        evs = s.wait_events(1)
        assert len(evs) == 1
        assert evs[0].data == "hello\nworld"
        assert evs[0].event == "greet"
        assert evs[0].id == ids[0]
    assert gw.wait_slots(0) == 0
