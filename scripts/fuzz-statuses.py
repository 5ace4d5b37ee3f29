"""Every status the OpenAPI document promises must be answered somewhere.

    python3 scripts/fuzz-statuses.py OPENAPI_JSON FUZZ_HAR

Reads the document the API served and the HAR report of the schemathesis run against it,
and lists, per operation, the documented statuses the fuzzer never saw. Each of those must be
in PROVEN_ELSEWHERE below: a status a fuzzer cannot provoke (a body that stalls, a store that
is down, a row PostgreSQL holds that no request can write), with the test that provokes it.
The test's name is looked up in crates/*/tests, so a renamed or deleted test fails this too.
"""

import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

# (operation or "*", status) -> (why the fuzzer cannot reach it, the test function that does).
PROVEN_ELSEWHERE = {
    ("*", "408"): (
        "a body that stops arriving: the fuzzer sends whole requests",
        "stalled_bodies_slow_heads_and_idle_connections_are_cut_off",
    ),
    ("*", "413"): (
        "a body over 256 KiB: the fuzzer keeps bodies small",
        "bad_input_gets_json_errors_and_the_server_keeps_serving",
    ),
    ("*", "409"): (
        "a write PostgreSQL refuses as a conflict (a constraint of the application's schema)",
        "postgresql_refusals_are_4xx_or_a_500_with_an_id_never_503",
    ),
    ("*", "500"): (
        "a row no request can write: the fuzzer must never see a 500",
        "an_unreadable_row_answers_a_json_error_that_names_it",
    ),
    ("*", "503"): (
        "PostgreSQL down: the fuzzer runs against live stores",
        "with_postgres_down_the_api_answers_503_in_json",
    ),
    ("GET *", "401"): (
        "a read route under READ_ACCESS=token: the fuzzed API runs with the default, open",
        "read_routes_need_the_token_only_under_read_access_token",
    ),
    ("GET /inconsistencies/{id}", "400"): (
        "the fuzzer is given an existing incident's id, to get past the 404",
        "bad_input_gets_json_errors_and_the_server_keeps_serving",
    ),
    ("GET /inconsistencies/{id}", "404"): (
        "the fuzzer is given an existing incident's id",
        "bad_input_gets_json_errors_and_the_server_keeps_serving",
    ),
    ("POST /inconsistencies/{id}/refresh", "404"): (
        "the fuzzer is given an existing incident's id",
        "refreshing_an_unknown_incident_is_a_404",
    ),
    ("GET /entities/{name}/rebuild", "404"): (
        "the fuzzer is given the one entity there is, to get past the 404",
        "an_admin_starts_a_rebuild_and_follows_it_to_the_end",
    ),
    ("POST /entities/{name}/rebuild", "404"): (
        "the fuzzer is given the one entity there is",
        "an_admin_starts_a_rebuild_and_follows_it_to_the_end",
    ),
    ("POST /entities/{name}/rebuild", "409"): (
        "another rebuild holding the lock: the fuzzer's own are over in milliseconds",
        "an_admin_starts_a_rebuild_and_follows_it_to_the_end",
    ),
}


def proof(method, path, status):
    for key in (f"{method} {path}", f"{method} *", "*"):
        if (key, status) in PROVEN_ELSEWHERE:
            return PROVEN_ELSEWHERE[(key, status)]
    return None


def operations(doc):
    for path, item in doc["paths"].items():
        pattern = re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", path) + "$")
        for method, op in item.items():
            if method in ("get", "post", "put", "delete", "patch"):
                yield path, method.upper(), pattern, set(op.get("responses", {}))


def main(openapi, har):
    doc = json.loads(pathlib.Path(openapi).read_text())
    entries = json.loads(pathlib.Path(har).read_text())["log"]["entries"]
    ops = list(operations(doc))
    seen = {(path, method): set() for path, method, _, _ in ops}
    # The document itself was just fetched, with a 200, to be given here.
    seen[("/openapi.json", "GET")].add("200")
    for e in entries:
        url = e["request"]["url"]
        path = "/" + url.split("://", 1)[1].split("/", 1)[1].split("?", 1)[0]
        method = e["request"]["method"]
        for p, m, pattern, _ in ops:
            if m == method and pattern.match(path):
                seen[(p, m)].add(str(e["response"]["status"]))
                break
    tests = "\n".join(f.read_text() for f in ROOT.glob("crates/*/tests/*.rs"))
    missing, proven = [], 0
    for path, method, _, documented in ops:
        for status in sorted(documented - seen[(path, method)]):
            why = proof(method, path, status)
            if why and re.search(rf"\bfn {why[1]}\b", tests):
                proven += 1
                continue
            missing.append(f"{method} {path}: {status}" + (f" (test {why[1]} not found)" if why else ""))
    if missing:
        print("documented, never answered by the fuzzer, and not proven by a named test:",
              *missing, sep="\n  ", file=sys.stderr)
        return 1
    answered = sum(len(s) for s in seen.values())
    print(f"every documented status answered: {answered} by the fuzzer over {len(entries)} requests, "
          f"{proven} by named tests")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
