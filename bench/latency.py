"""Decision latency against policy size, with 100,000 registered devices: L1 hit, L2 hit, compiled index, Casbin."""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path
from typing import Any

from bench.setup import ROOT
from pdp.runtime.cache import LruCache
from pdp.core.engine import Decision
from pdp.core.index import PolicyIndex
from pdp.policy.load import load_policy
from pdp.registry.device import Device

TYPES = [f"type{i}" for i in range(50)]
LOCATIONS = [f"site{i}" for i in range(200)]
PURPOSES = [f"purpose{i}" for i in range(10)]
ACTIONS = ["publish", "subscribe", "receive"]


def make_devices(count: int, rng: random.Random) -> list[Device]:
    return [Device(f"dev-{i:06d}", rng.choice(TYPES), rng.choice(LOCATIONS), rng.choice(PURPOSES), "owner", "active")
            for i in range(count)]


def make_policy(count: int, rng: random.Random, extra_topics: tuple[str, ...] = (),
                header: tuple[str, ...] = ()) -> str:
    """``count`` generated rules; ``extra_topics`` (formatted with ``i``) widen the choice of patterns."""
    lines = list(header)
    for i in range(count):
        dtype = "*" if rng.random() < 0.1 else rng.choice(TYPES)
        location = "*" if rng.random() < 0.3 else rng.choice(LOCATIONS)
        purpose = "*" if rng.random() < 0.5 else rng.choice(PURPOSES)
        topic = rng.choice([
            f"sites/{{location}}/{{device_id}}/leaf{i % 97}",
            f"sites/{{location}}/+/cmd{i % 13}",
            f"fleet/{{type}}/group{i % 31}/#",
            f"shared/topic{i}",
            *(extra.format(i=i) for extra in extra_topics),
        ])
        effect = "deny" if rng.random() < 0.15 else "allow"
        lines.append(f"p, rule{i}, {dtype}, {location}, {purpose}, {topic}, {rng.choice(ACTIONS)}, {effect}")
    return "\n".join(lines) + "\n"


def make_request(device: Device, rng: random.Random) -> tuple[str, str]:
    action = rng.choice(ACTIONS)
    topic = rng.choice([
        f"sites/{device.location}/{device.device_id}/leaf{rng.randint(0, 96)}",
        f"sites/{device.location}/x/cmd{rng.randint(0, 12)}",
        f"fleet/{device.type}/group{rng.randint(0, 30)}/a/b",
        f"shared/topic{rng.randint(0, 20000)}",
    ])
    return action, topic


def _percentiles(samples_ns: list[int]) -> dict[str, float]:
    ordered = sorted(samples_ns)
    return {
        "median_us": round(statistics.median(ordered) / 1000, 3),
        "p99_us": round(ordered[int(len(ordered) * 0.99) - 1] / 1000, 3),
        "samples": len(ordered),
    }


def _time(fn: Any, requests: list[tuple[Device, str, str]]) -> dict[str, float]:
    samples = []
    clock = time.perf_counter_ns
    for device, action, topic in requests:
        start = clock()
        fn(device, action, topic)
        samples.append(clock() - start)
    return _percentiles(samples)


def _redis_l2(requests: list[tuple[Device, str, str]], redis_url: str | None) -> dict[str, Any]:
    if not redis_url:
        return {"skipped": "no Redis"}
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        return {"skipped": f"Redis unreachable: {exc}"}
    key = "mqtt-pdp-bench:l2"
    fields = {f"{d.attributes_revision}|{a}|{t}": "A|rule" for d, a, t in requests}
    client.hset(key, mapping=fields)
    try:
        return _time(lambda d, a, t: client.hget(key, f"{d.attributes_revision}|{a}|{t}"), requests)
    finally:
        client.delete(key)


def run(workdir: Path, sizes: tuple[int, ...] = (10, 100, 1000, 10000), requests: int = 20000,
        redis_url: str | None = None) -> dict[str, Any]:
    rng = random.Random(7)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "model.conf").write_text((ROOT / "policies" / "model.conf").read_text())
    devices = make_devices(100_000, rng)
    rows = []
    for size in sizes:
        (workdir / "policy.csv").write_text(make_policy(size, rng))
        started = time.perf_counter()
        policy = load_policy(workdir / "model.conf", workdir / "policy.csv")
        loaded = time.perf_counter()
        index = PolicyIndex(policy.rules)
        built = time.perf_counter()
        reqs = [(device, *make_request(device, rng)) for device in rng.sample(devices, requests)]
        compiled = _time(lambda d, a, t: index.decide(d.attrs, a, t), reqs)
        cache: LruCache[tuple[str, str, str], Decision] = LruCache(100_000)

        def cached(d: Device, a: str, t: str) -> Decision:
            key = (d.attributes_revision, a, t)
            hit = cache.get(key)
            if hit is None:
                hit = index.decide(d.attrs, a, t)
                cache.put(key, hit)
            return hit

        for d, a, t in reqs:
            cached(d, a, t)
        l1 = _time(cached, reqs)
        casbin_reqs = reqs[: max(20, min(2000, 200_000 // size))]
        casbin = _time(lambda d, a, t: policy.reference.enforcer.enforce(d, t, a), casbin_reqs)
        l2 = _redis_l2(reqs[:5000], redis_url)
        rows.append({
            "rules": size, "devices": len(devices), "l1_hit": l1, "l2_hit": l2, "compiled": compiled, "casbin": casbin,
            "load_policy_s": round(loaded - started, 3), "build_index_s": round(built - loaded, 3),
        })
    return {"rows": rows}


def table(result: dict[str, Any]) -> str:
    def cell(d: dict[str, Any]) -> str:
        return f"{d['median_us']:>9.2f} {d['p99_us']:>9.2f}" if "median_us" in d else f"{'n/a':>9} {'n/a':>9}"

    lines = [f"{'rules':>6} | {'L1 med':>9} {'L1 p99':>9} | {'L2 med':>9} {'L2 p99':>9} | {'index med':>9} {'index p99':>9}"
             f" | {'casbin med':>10} {'casbin p99':>10} | {'load s':>6} {'index s':>7}   (microseconds)"]
    for r in result["rows"]:
        c = r["casbin"]
        lines.append(f"{r['rules']:>6} | {cell(r['l1_hit'])} | {cell(r['l2_hit'])} | {cell(r['compiled'])} | "
                     f"{c['median_us']:>10.0f} {c['p99_us']:>10.0f} | {r['load_policy_s']:>6.2f} {r['build_index_s']:>7.3f}")
    return "\n".join(lines)
