"""The model pool on the fake engine (fast tier): several models, LRU eviction, the memory budget, keep-alive,
model events, and what /v1/models and /readyz tell a caller. tests/test_serving.py proves it on real models."""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.helpers import CHAT, REPLY, assert_openai_error, chat_body, sse_events


def ask(box, model: str | None, content: str = "hi"):
    body = chat_body(content) | ({"model": model} if model else {})
    return box.client.post(CHAT, json=body)


def events(box) -> list[tuple[str, str, str]]:
    return [(e["event"], e["model"], e["outcome"]) for e in reversed(box.db.model_events())]


def test_two_models_are_loaded_at_once_and_each_answers(make_box):
    box = make_box(extra_models={"second": {"reply": "Second here."}})
    assert ask(box, None).get_json()["choices"][0]["message"]["content"] == REPLY
    r = ask(box, "second-alias")  # by alias
    assert r.status_code == 200 and r.get_json()["model"] == "second"
    assert r.get_json()["choices"][0]["message"]["content"] == "Second here."
    assert sorted(m.name for m in box.state.models.loaded()) == ["fake", "second"]
    assert events(box) == [("load", "fake", "ok"), ("load", "second", "ok")]
    assert [r["model"] for r in box.rows()] == ["fake", "second"]


def test_an_unknown_model_is_a_404_that_says_where_the_list_is(box):
    error = assert_openai_error(ask(box, "nope"), 404, "model_not_found", "model")
    assert "/v1/models" in error["message"]


def test_the_least_recently_used_idle_model_is_evicted_at_max_loaded(make_box):
    box = make_box(extra_models={"second": {}, "third": {}}, max_loaded=2)
    assert ask(box, "second").status_code == 200
    assert ask(box, "fake").status_code == 200  # fake is now more recent than second
    assert ask(box, "third").status_code == 200
    assert sorted(m.name for m in box.state.models.loaded()) == ["fake", "third"]
    assert ("evict", "second", "ok") in events(box)
    evicted = [e for e in box.db.model_events() if e["event"] == "evict"][0]
    assert evicted["who"] == "system" and "third" in evicted["detail"]


def test_max_loaded_one_swaps_models_on_demand(make_box):
    box = make_box(extra_models={"second": {"reply": "Two."}}, max_loaded=1)
    for model, reply in [("second", "Two."), ("fake", REPLY), ("second", "Two.")]:
        r = ask(box, model)
        assert r.status_code == 200 and r.get_json()["choices"][0]["message"]["content"] == reply
        assert [m.name for m in box.state.models.loaded()] == [model]


def test_a_memory_budget_that_fits_one_model_evicts_the_other(make_box):
    box = make_box(extra_models={"second": {}}, max_model_memory_mb=1)  # a fake model counts its file: < 1 MiB
    pool = box.state.models
    assert pool.default.memory_mib == 1
    assert ask(box, "second").status_code == 200
    assert [m.name for m in pool.loaded()] == ["second"]
    assert ("evict", "fake", "ok") in events(box)


def test_a_model_that_cannot_fit_gets_a_503_naming_the_setting(make_box):
    box = make_box(extra_models={"second": {"step_seconds": 0.05}}, max_loaded=1)
    slow = threading.Thread(target=ask, args=(box, "second"))
    slow.start()
    try:
        deadline = time.monotonic() + 5
        second = box.state.models.get("second")
        while not (second.in_use and second.runner.busy_slots) and time.monotonic() < deadline:
            time.sleep(0.01)  # generating on second, which evicted fake to load
        error = assert_openai_error(ask(box, "fake"), 503, "model_pool_full")
        assert "max_loaded" in error["message"] and "second" in error["message"]
    finally:
        slow.join()
    assert ask(box, "fake").status_code == 200  # once it is free, it is evicted


def test_a_model_that_is_loading_does_not_delay_another(make_box):
    box = make_box(extra_models={"slow": {"load_seconds": 1.5}})
    loading = threading.Thread(target=ask, args=(box, "slow"))
    loading.start()
    try:
        time.sleep(0.2)  # the slow model is loading now
        assert box.state.models.get("slow").loading
        start = time.perf_counter()
        assert ask(box, "fake").status_code == 200
        assert time.perf_counter() - start < 0.5
    finally:
        loading.join()
    assert [r["status"] for r in box.rows()] == [200, 200]


def test_requests_for_a_loading_model_share_one_load(make_box):
    box = make_box(extra_models={"slow": {"load_seconds": 0.5}})
    threads = [threading.Thread(target=ask, args=(box, "slow")) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert box.state.models.get("slow").runner.load_count == 1
    assert events(box) == [("load", "fake", "ok"), ("load", "slow", "ok")]
    assert [r["status"] for r in box.rows()] == [200] * 4


def test_a_model_past_its_keep_alive_is_unloaded_but_the_default_stays(make_box):
    box = make_box(extra_models={"second": {}}, keep_alive=0.2)
    assert ask(box, "second").status_code == 200
    deadline = time.monotonic() + 5
    while box.state.models.get("second").runner.is_loaded and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [m.name for m in box.state.models.loaded()] == ["fake"]
    assert ("expire", "second", "ok") in events(box)


def test_model_settings_give_a_model_its_own_slots_and_context(make_box):
    box = make_box(extra_models={"second": {}}, model_settings={"second": {"parallel": 1, "context_length": 128}})
    second = box.state.models.get("second")
    assert second.admission.slots == 1 and second.runner.spec["context_length"] == 128
    assert box.admission.slots == 2  # the default model keeps the service's


def test_a_package_suggests_its_serving_settings_and_model_settings_override_them(make_box):
    box = make_box(extra_models={"second": {"package": {"serving": {"parallel": 1, "context_length": 128,
                                                                    "keep_alive": 7}}},
                                 "third": {"package": {"serving": {"parallel": 1, "context_length": 128}}}},
                   model_settings={"third": {"parallel": 3}})
    second, third = box.state.models.get("second"), box.state.models.get("third")
    assert second.admission.slots == 1 and second.runner.spec["context_length"] == 128
    assert second.options["keep_alive"] == 7 and second.options["threads"] == box.settings.threads
    assert third.admission.slots == 3 and third.runner.spec["context_length"] == 128
    admin = {m.name: box.state.models.describe(m, internals=True)["serving"] for m in (second, third)}
    assert admin["second"]["keep_alive"] == {"value": 7, "from": "package"}
    assert admin["third"]["parallel"] == {"value": 3, "from": "model_settings"}
    assert admin["third"]["threads"] == {"value": box.settings.threads, "from": "service"}


def test_models_list_every_known_model_without_internals(make_box, tmp_path):
    box = make_box(extra_models={"second": {"package": {"target": "cpu", "metrics": {"perplexity_ratio": 1.02}}}})
    data = box.client.get("/v1/models").get_json()["data"]
    assert [m["id"] for m in data] == ["fake", "second"]
    fake, second = (m["appliance"] for m in data)
    assert fake["loaded"] and fake["default"] and not second["loaded"]
    assert second["kind"] == "chat" and second["format"] == "fake" and second["size_bytes"] > 0
    assert second["context_length"] == 256 and second["aliases"] == ["second-alias"]
    assert second["target"] == "cpu" and second["metrics"] == {"perplexity_ratio": 1.02}  # its package's report
    assert fake["target"] is None and fake["metrics"] is None
    text = box.client.get("/v1/models").get_data(as_text=True) + box.client.get("/readyz").get_data(as_text=True)
    assert str(tmp_path) not in text and "pid" not in text and "path" not in text
    one = box.client.get("/v1/models/second-alias").get_json()
    assert one["id"] == "second"
    admin = box.client.get("/api/models").get_json()["data"]
    assert admin[0]["path"].startswith(str(tmp_path)) and "estimated_memory_mib" in admin[1]


def test_admin_load_and_unload_are_model_events_with_who_asked(make_box):
    box = make_box(extra_models={"second": {}})
    r = box.client.post("/api/models/second/load", json={})
    assert r.status_code == 200 and r.get_json()["loaded"]
    assert box.client.post("/api/models/second/unload", json={}).get_json()["loaded"] is False
    rows = list(reversed(box.db.model_events()))
    assert [(e["event"], e["model"]) for e in rows] == [("load", "fake"), ("load", "second"), ("unload", "second")]
    assert all(e["who"] == "127.0.0.1" and e["duration_ms"] >= 0 for e in rows[1:])
    assert box.client.get("/api/models/events").get_json()["data"][0]["event"] == "unload"
    assert box.client.get("/api/status").get_json()["models"]["events"][0]["event"] == "unload"
    assert_openai_error(box.client.post("/api/models/nope/load", json={}), 404, "model_not_found")
    metrics = box.client.get("/metrics").get_data(as_text=True)
    assert 'appliance_model_events_total{event="load",model="second",outcome="ok"} 1.0' in metrics


def test_unloading_a_busy_model_is_refused_unless_forced(make_box):
    box = make_box(fake={"step_seconds": 0.05})
    worker = threading.Thread(target=ask, args=(box, None))
    worker.start()
    try:
        deadline = time.monotonic() + 5
        while box.state.models.default.in_use == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert_openai_error(box.client.post("/api/models/fake/unload", json={}), 409, "model_busy")
    finally:
        worker.join()
    assert box.client.post("/api/models/fake/unload", json={}).status_code == 200


def test_deep_idle_unloads_every_model_and_the_wake_brings_them_back(make_box):
    box = make_box(extra_models={"second": {}})
    assert ask(box, "second").status_code == 200
    assert box.client.post("/api/power", json={"state": "deep_idle"}).status_code == 200
    assert box.state.models.loaded() == []
    assert ask(box, "second").status_code == 200  # wakes the box: both come back
    assert sorted(m.name for m in box.state.models.loaded()) == ["fake", "second"]


@pytest.mark.parametrize("setting, value", [("max_loaded", 0), ("keep_alive", -1)])
def test_pool_settings_are_checked(make_box, setting, value):
    from appliance.config import ConfigError

    with pytest.raises(ConfigError, match=setting):
        make_box(**{setting: value})


def test_model_settings_reject_unknown_options(make_box):
    from appliance.config import ConfigError

    with pytest.raises(ConfigError, match="unknown option"):
        make_box(model_settings={"fake": {"slots": 2}})


# -- swap ---------------------------------------------------------------------------------------------
def test_a_swap_moves_the_name_to_the_new_model_and_retires_the_old(make_box):
    box = make_box(extra_models={"second": {"reply": "Second here."}})
    r = box.client.post("/api/models/fake-alias/swap", json={"package": "second"})
    assert r.status_code == 200 and r.get_json()["id"] == "second" and r.get_json()["loaded"]
    assert set(r.get_json()["swap"]) == {"load_ms", "warm_up_ms", "switch_ms", "chats_carried"}
    for name in (None, "fake", "fake-alias"):  # the old model's name and alias, and the default, all moved
        r = ask(box, name)
        assert r.get_json()["model"] == "second" and r.get_json()["choices"][0]["message"]["content"] == "Second here."
    deadline = time.monotonic() + 5  # the old runner ends once it has nothing in flight, then its unload is logged
    while (box.runner.is_loaded or len(events(box)) < 4) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not box.runner.is_loaded
    assert events(box)[1:] == [("load", "second", "ok"), ("swap", "second", "ok"), ("unload", "fake", "ok")]


def test_a_swap_to_a_model_that_fails_its_probe_is_refused_and_the_old_keeps_serving(make_box):
    box = make_box(extra_models={"broken": {"fail_on": "capital"}})  # the engine fails on the probe's prompt
    error = assert_openai_error(box.client.post("/api/models/fake/swap", json={"package": "broken"}), 422,
                                "swap_failed", "package")
    assert "fake" in error["message"] and "probe" in error["message"]
    assert ask(box, "fake").get_json()["choices"][0]["message"]["content"] == REPLY
    assert [m.name for m in box.state.models.loaded()] == ["fake"]  # the broken one was unloaded again
    assert events(box)[1:] == [("load", "broken", "ok"), ("unload", "broken", "ok"), ("swap", "broken", "failed")]
    assert_openai_error(box.client.post("/api/models/fake/swap", json={"package": "nope"}), 404, "model_not_found",
                        "package")
    assert_openai_error(box.client.post("/api/models/fake/swap", json={}), 400)


def test_clients_streaming_through_a_swap_all_succeed_each_from_one_model(make_box):
    box = make_box(fake={"step_seconds": 0.005}, extra_models={"second": {"reply": "Second here.", "step_seconds": 0.005}},
                   queue_size=32)
    texts, failures, stop = [], [], threading.Event()

    def client():
        while not stop.is_set():
            r = box.client.post(CHAT, json=chat_body(stream=True, model="fake"))
            if r.status_code != 200:
                failures.append(r.status_code)
                continue
            chunks = [e for e in sse_events(r.get_data(as_text=True)) if e != "[DONE]"]
            texts.append("".join(c["choices"][0]["delta"].get("content", "") for c in chunks))

    clients = [threading.Thread(target=client) for _ in range(8)]
    for t in clients:
        t.start()
    time.sleep(0.5)
    assert box.client.post("/api/models/fake/swap", json={"package": "second"}).status_code == 200
    time.sleep(0.5)
    stop.set()
    for t in clients:
        t.join()
    assert failures == []
    assert set(texts) == {REPLY, "Second here."}  # both served, and never a mix within one answer


# -- live health probes ----------------------------------------------------------------------------------
def wait_for_event(box, event: str, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in box.db.model_events() if e["event"] == event]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no {event} event in {timeout} s: {events(box)}")


def test_a_model_failing_three_probes_in_a_row_is_restarted(make_box):
    # Its engine is too slow for the probe's deadline: each live probe times out.
    box = make_box(extra_models={"slow": {"step_seconds": 0.3}}, probe_every=0.1, probe_timeout=0.1)
    assert box.client.post("/api/models/slow/load", json={}).status_code == 200
    restart = wait_for_event(box, "restart")
    assert restart["model"] == "slow" and restart["outcome"] == "ok" and restart["who"] == "system"
    failed = [e for e in events(box) if e[0] == "probe_failed"]
    assert failed[:3] == [("probe_failed", "slow", "failed")] * 3 and ("probe_failed", "fake", "failed") not in failed
    assert box.state.models.get("slow").runner.load_count == 2
    assert [r["endpoint"] for r in box.rows()] == ["/api/models/slow/load"]  # probes are not request-log rows
    assert box.state.power.state == "active" and box.state.power.in_flight == 0


def test_a_newly_swapped_model_failing_its_probes_is_rolled_back(make_box):
    box = make_box(extra_models={"second": {"reply": "Two.", "step_seconds": 0.3}}, probe_every=0.1,
                   probe_timeout=0.1, swap_probe_tokens=2, swap_probe_timeout=10)
    assert box.client.post("/api/models/fake/swap", json={"package": "second"}).status_code == 200
    rollback = wait_for_event(box, "rollback")
    assert rollback["model"] == "second" and "fake" in rollback["detail"]
    r = ask(box, None)
    assert r.get_json()["model"] == "fake" and r.get_json()["choices"][0]["message"]["content"] == REPLY
    assert ask(box, "fake").get_json()["model"] == "fake"
    wait_for_event(box, "unload")
    assert "restart" not in [e[0] for e in events(box)]


def test_probes_leave_healthy_models_alone_and_wake_nothing(make_box):
    box = make_box(probe_every=0.05)
    time.sleep(0.5)
    assert events(box) == [("load", "fake", "ok")] and box.rows() == []
    assert box.client.post("/api/power", json={"state": "deep_idle"}).status_code == 200
    time.sleep(0.3)
    assert box.state.models.loaded() == [] and box.state.power.state == "deep_idle"


@pytest.mark.parametrize("keep_alive", [0, "0s", "100ms"])
def test_a_request_may_ask_for_a_shorter_keep_alive(make_box, keep_alive):
    box = make_box(extra_models={"second": {}})
    assert box.client.post(CHAT, json=chat_body(model="second", keep_alive=keep_alive)).status_code == 200
    wait_for_event(box, "expire")
    assert [m.name for m in box.state.models.loaded()] == ["fake"]


def test_a_request_cannot_keep_a_model_longer_than_the_box_allows(make_box):
    box = make_box(extra_models={"second": {}}, keep_alive=0.2)
    assert box.client.post(CHAT, json=chat_body(model="second", keep_alive="1h")).status_code == 200
    assert wait_for_event(box, "expire")["model"] == "second"


@pytest.mark.parametrize("keep_alive", ["soon", -1, True, "5 minutes"])
def test_a_bad_keep_alive_is_a_400_naming_it(box, keep_alive):
    assert_openai_error(box.client.post(CHAT, json=chat_body(keep_alive=keep_alive)), 400, param="keep_alive")


# -- what a review found --------------------------------------------------------------------------------
def test_a_model_listed_long_ago_and_loaded_now_is_not_expired_at_once(make_box):
    box = make_box(extra_models={"second": {}}, keep_alive=1)
    assert box.client.get("/v1/models").status_code == 200  # sets "second" up, unloaded
    time.sleep(1.2)
    assert box.client.post("/api/models/second/load", json={}).status_code == 200
    time.sleep(0.4)  # its keep-alive counts from the load
    assert box.state.models.get("second").runner.is_loaded


def test_swaps_in_a_row_and_back_keep_every_name_on_the_serving_model(make_box):
    box = make_box(extra_models={"second": {"reply": "Two."}, "third": {"reply": "Three."}})
    pool = box.state.models
    assert box.client.post("/api/models/fake/swap", json={"package": "second"}).status_code == 200
    assert box.client.post("/api/models/fake/swap", json={"package": "third"}).status_code == 200
    assert {n: pool.get(n).name for n in ("fake", "fake-alias", "second")} | {None: pool.get(None).name} == {
        "fake": "third", "fake-alias": "third", "second": "third", None: "third"}
    assert pool.default.keep_alive is None and pool.get("third").keep_alive is None  # the default stays loaded
    assert box.client.post("/api/models/third/swap", json={"package": "fake"}).status_code == 200
    assert {n: pool.get(n).name for n in ("fake", "second", "third")} == {"fake": "fake", "second": "fake",
                                                                          "third": "fake"}
    assert ask(box, None).get_json()["choices"][0]["message"]["content"] == REPLY


def test_a_non_finite_keep_alive_is_refused(box):
    body = json.dumps(chat_body()).replace("}]}", '}], "keep_alive": NaN}')
    r = box.client.post(CHAT, data=body, content_type="application/json")
    assert_openai_error(r, 400)


def test_a_request_cannot_unload_the_default_model(make_box):
    box = make_box(keep_alive=0.1)
    assert box.client.post(CHAT, json=chat_body(keep_alive=0)).status_code == 200
    time.sleep(0.4)
    assert box.runner.is_loaded


def test_deep_idle_while_a_model_loads_unloads_it_once_loaded(make_box):
    box = make_box(extra_models={"slow": {"load_seconds": 0.5}})
    loading = threading.Thread(target=lambda: box.client.post("/api/models/slow/load", json={}))
    loading.start()
    time.sleep(0.1)
    assert box.state.models.get("slow").loading
    assert box.client.post("/api/power", json={"state": "deep_idle"}).status_code == 200
    loading.join()
    assert box.state.models.loaded() == []  # deep idle means nothing stays loaded, a late load included


def test_a_model_unused_for_idle_after_frees_its_kv_cache_while_another_keeps_the_box_busy(make_box):
    box = make_box(extra_models={"second": {}}, idle_after=0.5, deep_idle_after=60, keep_alive=60)
    pool = box.state.models
    assert ask(box, "second").status_code == 200
    second = pool.get("second")
    released = []
    second.runner.release_cache = lambda: released.append(time.monotonic())
    deadline = time.monotonic() + 5
    while not released and time.monotonic() < deadline:
        assert ask(box, "fake").status_code == 200  # the box stays busy, so it never idles as a whole
        time.sleep(0.1)
    assert released and second.resting and not pool.default.resting
    assert second.runner.is_loaded  # idle frees the cache; only keep_alive unloads
    assert ask(box, "second").status_code == 200 and not second.resting
