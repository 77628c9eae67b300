"""``meshcore status | config-dump | clusters | route`` against a control plane and a resource file."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import List, Tuple

import pytest

from meshcore.cli import main

from .conftest import TARGET


def run(capsys, *args: str) -> Tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(params=["bootstrap", "file"])
def source(request) -> List[str]:
    """Command-line arguments naming the configuration: a control plane (bootstrap) or a file."""
    if request.param == "bootstrap":
        bootstrap = request.getfixturevalue("bootstrap_file")
        return ["--bootstrap", bootstrap, "--target", TARGET]
    return ["--file", request.getfixturevalue("resource_file")]


# -- status -------------------------------------------------------------------------------------------


def test_status_lists_every_resource_acked(capsys, source):
    code, out, err = run(capsys, "status", *source)
    assert code == 0, err
    lines = out.splitlines()
    assert any(line.split()[:2] == [TARGET, "READY"] for line in lines if line)
    table = {tuple(line.split()[:2]): line.split()[3] for line in lines
             if line[:3] in ("LDS", "RDS", "CDS", "EDS")}
    assert table == {("LDS", TARGET): "ACKED", ("RDS", "9080"): "ACKED", ("CDS", "reviews-v1"): "ACKED",
                     ("CDS", "reviews-v2"): "ACKED", ("EDS", "reviews-v1"): "ACKED", ("EDS", "reviews-v2"): "ACKED"}


def test_status_json_has_versions(capsys, bootstrap_file, plane):
    code, out, _ = run(capsys, "status", "--bootstrap", bootstrap_file, "--target", TARGET, "--json")
    assert code == 0
    data = json.loads(out)
    assert data["node"] == "cli-test"
    assert data["targets"] == [{"target": TARGET, "ready": True, "version": data["targets"][0]["version"],
                                "error": ""}]
    assert {r["version"] for r in data["resources"]} == {plane.version}
    assert [r["type"] for r in data["resources"]] == ["LDS", "RDS", "CDS", "CDS", "EDS", "EDS"]


def test_status_shows_a_nack_and_fails(capsys, bootstrap_file, plane):
    from .conftest import _eds_cluster

    plane.update([{"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
                   **_eds_cluster("reviews-v2", outlier_detection={"max_ejection_percent": 101})}])
    code, out, _ = run(capsys, "status", "--bootstrap", bootstrap_file, "--target", TARGET, "--json")
    assert code == 1
    rows = {(r["type"], r["name"]): r for r in json.loads(out)["resources"]}
    bad = rows[("CDS", "reviews-v2")]
    assert bad["status"] == "NACKED" and "max_ejection_percent" in bad["error"]
    assert rows[("CDS", "reviews-v1")]["status"] == "ACKED"


def test_status_of_a_missing_target_is_not_ready(capsys, bootstrap_file):
    code, out, _ = run(capsys, "status", "--bootstrap", bootstrap_file, "--target", "nope:1", "--timeout", "0.3")
    assert code == 1
    assert "NOT READY" in out and "nope:1" in out and "REQUESTED" in out


# -- config-dump --------------------------------------------------------------------------------------


def test_config_dump_is_csds_json(capsys, source):
    code, out, _ = run(capsys, "config-dump", *source)
    assert code == 0
    dump = json.loads(out)
    configs = dump["generic_xds_configs"]
    assert len(configs) == 6
    assert all(c["client_status"] == "ACKED" for c in configs)
    lds = next(c for c in configs if c["type_url"].endswith("Listener"))
    assert lds["xds_config"]["name"] == TARGET


def test_config_dump_type_filter_and_no_resources(capsys, bootstrap_file):
    code, out, _ = run(capsys, "config-dump", "--bootstrap", bootstrap_file, "--target", TARGET,
                       "--type", "eds", "--no-resources")
    assert code == 0
    configs = json.loads(out)["generic_xds_configs"]
    assert [c["name"] for c in configs] == ["reviews-v1", "reviews-v2"]
    assert all("xds_config" not in c for c in configs)


# -- clusters -----------------------------------------------------------------------------------------


def test_clusters_json(capsys, source):
    code, out, _ = run(capsys, "clusters", *source, "--json")
    assert code == 0
    clusters = {c["name"]: c for c in json.loads(out)["clusters"]}
    assert sorted(clusters) == ["reviews-v1", "reviews-v2"]
    v1, v2 = clusters["reviews-v1"], clusters["reviews-v2"]
    assert v1["policy"] == "LEAST_REQUEST" and v2["policy"] == "ROUND_ROBIN"
    assert v1["outlier_detection"]["consecutive_5xx"] == 3
    assert v1["targets"] == [TARGET]
    assert [(e["address"], e["weight"], e["priority"], e["locality"], e["health"], e["ejected"])
            for e in v1["endpoints"]] == [("10.0.0.1:9080", 1, 0, "us/east", "UNKNOWN", False),
                                          ("10.0.0.2:9080", 3, 0, "us/east", "UNKNOWN", False)]
    assert v2["endpoints"][0]["health"] == "DEGRADED"


def test_clusters_text(capsys, source):
    code, out, _ = run(capsys, "clusters", *source)
    assert code == 0
    assert "reviews-v1  (EDS; LEAST_REQUEST)" in out
    assert "outlier detection: consecutive_5xx=3" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("10.0.")]
    assert ["10.0.0.2:9080", "UNKNOWN", "3", "0", "us/east", "no", "0"] in rows


def test_clusters_show_an_ejected_endpoint(resource_file):
    """The ``ejected`` column reads the balancer (what outlier detection sets)."""
    from meshcore import Mesh
    from meshcore.admin import clusters

    with Mesh.from_file(resource_file, watch=False) as mesh:
        mesh.wait_ready(TARGET, timeout=5)
        lb = mesh.config(TARGET).clusters["reviews-v1"].lb
        lb.set_ejected(lb.endpoints[0], True)
        v1 = next(c for c in clusters(mesh, [TARGET]) if c["name"] == "reviews-v1")
        assert [e["ejected"] for e in v1["endpoints"]] == [True, False]


# -- route ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("random_value,cluster", [(5, "reviews-v1"), (95, "reviews-v2"), (189, "reviews-v1"),
                                                  (1099, "reviews-v2")])
def test_route_weighted_pick(capsys, source, random_value, cluster):
    code, out, _ = run(capsys, "route", "GET", f"http://{TARGET}/reviews/1", *source,
                       "--random-value", str(random_value), "--json")
    assert code == 0
    x = json.loads(out)
    assert x["outcome"] == "cluster"
    assert x["virtual_host"]["name"] == "reviews"
    assert x["virtual_host"]["domain"] == TARGET and x["virtual_host"]["kind"] == "exact"
    assert x["route"]["index"] == 3 and x["route"]["name"] == "split" and x["route"]["match"] == "prefix '/'"
    a = x["action"]
    assert a["kind"] == "weighted_clusters" and a["total"] == 100
    assert a["selection"] == random_value % 100 and a["chosen"] == cluster
    assert x["cluster"]["name"] == cluster
    assert x["cluster"]["picked"]["address"].startswith("10.0.")
    assert x["timeout"] == 2.0
    assert x["retry_policy"]["retry_on"] == ["5xx"] and x["retry_policy"]["num_retries"] == 2


def test_route_header_match_text(capsys, source):
    code, out, _ = run(capsys, "route", "get", f"http://{TARGET}/x", "-H", "X-Canary: 1", *source)
    assert code == 0
    assert "route         #0 canary-header: prefix '/' and header x-canary exact '1'" in out
    assert "virtual host  reviews: 'reviews:9080' matched domain 'reviews:9080' (exact)" in out
    assert "action        cluster reviews-v2" in out
    assert "endpoint      10.0.1.1:9080 (DEGRADED" in out
    assert "timeout       15 s" in out and "retry policy  none" in out


def test_route_weighted_text_names_skipped_routes(capsys, source):
    code, out, _ = run(capsys, "route", "GET", f"http://{TARGET}/a", *source, "--random-value", "95")
    assert code == 0
    assert "(#0 canary-header did not match: prefix '/' and header x-canary exact '1')" in out
    assert "(#1 health did not match: path '/healthz')" in out
    assert "weighted clusters reviews-v1 90, reviews-v2 10: random value % 100 = 95 -> reviews-v2" in out
    assert "cluster       reviews-v2 (EDS, ROUND_ROBIN, 1 endpoint, 0 ejected)" in out
    assert "retry policy  retry_on 5xx, num_retries 2" in out


def test_route_direct_response_and_redirect(capsys, source):
    code, out, _ = run(capsys, "route", "GET", f"http://{TARGET}/healthz", *source, "--json")
    assert code == 0
    x = json.loads(out)
    assert x["outcome"] == "direct_response"
    assert x["action"] == {"kind": "direct_response", "status": 200, "body": "ok"}
    assert "cluster" not in x
    code, out, _ = run(capsys, "route", "GET", f"http://{TARGET}/old/page?q=1", *source)
    assert code == 0
    assert "redirect 301 to http://reviews:9080/new/page?q=1" in out


def test_route_unknown_target(capsys, bootstrap_file):
    code, out, err = run(capsys, "route", "GET", "http://nope:9080/", "--bootstrap", bootstrap_file,
                         "--timeout", "0.3", "--json")
    assert code == 1
    x = json.loads(out)
    assert x["outcome"] == "unavailable" and "nope:9080" in x["error"]


def test_route_no_route_is_explained(capsys, tmp_path):
    from .conftest import resources

    res = resources()
    res["routes"][0]["virtual_hosts"][0]["routes"] = [
        {"name": "only-api", "match": {"prefix": "/api"}, "route": {"cluster": "reviews-v1"}}]
    path = tmp_path / "mesh.json"
    path.write_text(json.dumps(res))
    code, out, _ = run(capsys, "route", "GET", f"http://{TARGET}/other", "--file", str(path))
    assert code == 1
    assert "no route of virtual host 'reviews' matches GET /other (Envoy: 404, NR)" in out


def test_route_target_override_with_file(capsys, resource_file):
    # --target picks the listener; virtual hosts still see the URL's authority (the Host header)
    code, out, _ = run(capsys, "route", "GET", "http://example.com/healthz", "--file", resource_file,
                       "--target", TARGET, "--json")
    assert code == 1
    x = json.loads(out)
    assert x["request"]["target"] == TARGET and x["outcome"] == "no_virtual_host"
    host = TARGET.split(":")[0]
    code, out, _ = run(capsys, "route", "GET", f"http://{host}/healthz", "--file", resource_file,
                       "--target", TARGET, "--json")
    assert code == 0 and json.loads(out)["outcome"] == "direct_response"


# -- errors ---------------------------------------------------------------------------------------------


def test_bad_bootstrap_is_a_clear_error(capsys, tmp_path):
    bad = tmp_path / "bootstrap.json"
    bad.write_text("{not json")
    code, out, err = run(capsys, "status", "--bootstrap", str(bad), "--target", TARGET)
    assert code == 2 and out == ""
    assert err.startswith("meshcore status: bad xDS bootstrap: ") and "not valid JSON" in err
    assert str(bad) in err


def test_bootstrap_without_servers(capsys, tmp_path):
    bad = tmp_path / "bootstrap.json"
    bad.write_text(json.dumps({"node": {"id": "x"}}))
    code, _, err = run(capsys, "clusters", "--bootstrap", str(bad), "--target", TARGET)
    assert code == 2 and "xds_servers" in err


def test_missing_bootstrap(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("GRPC_XDS_BOOTSTRAP", raising=False)
    monkeypatch.delenv("GRPC_XDS_BOOTSTRAP_CONFIG", raising=False)
    code, _, err = run(capsys, "status", "--target", TARGET)
    assert code == 2 and "GRPC_XDS_BOOTSTRAP" in err
    code, _, err = run(capsys, "status", "--bootstrap", str(tmp_path / "absent.json"), "--target", TARGET)
    assert code == 2 and "cannot read the bootstrap file" in err


def test_bootstrap_from_environment(capsys, monkeypatch, bootstrap_file):
    monkeypatch.setenv("GRPC_XDS_BOOTSTRAP", bootstrap_file)
    code, out, _ = run(capsys, "status", "--target", TARGET, "--json")
    assert code == 0 and json.loads(out)["node"] == "cli-test"


def test_bootstrap_needs_a_target(capsys, bootstrap_file):
    code, _, err = run(capsys, "status", "--bootstrap", bootstrap_file)
    assert code == 2 and "--target" in err


def test_bad_resource_file(capsys, tmp_path):
    code, _, err = run(capsys, "clusters", "--file", str(tmp_path / "absent.yaml"))
    assert code == 2 and "absent.yaml" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, _, err = run(capsys, "status", "--file", str(bad))
    assert code == 2 and "bad resource file" in err
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"clusters": [{"name": "c", "type": "EDS", "eds_cluster_config": {}}]}))
    code, _, err = run(capsys, "status", "--file", str(empty))
    assert code == 2 and "has no listeners; give --target" in err


def test_invalid_resource_in_a_file_shows_as_nacked(capsys, tmp_path):
    from .conftest import resources

    res = resources()
    res["clusters"][1]["outlier_detection"] = {"max_ejection_percent": 101}
    path = tmp_path / "mesh.json"
    path.write_text(json.dumps(res))
    code, out, _ = run(capsys, "status", "--file", str(path), "--timeout", "0.5", "--json")
    assert code == 1
    rows = {(r["type"], r["name"]): r for r in json.loads(out)["resources"]}
    assert rows[("CDS", "reviews-v2")]["status"] == "NACKED"


def test_bad_header_and_url(capsys, resource_file):
    code, _, err = run(capsys, "route", "GET", f"http://{TARGET}/", "-H", "no-colon", "--file", resource_file)
    assert code == 2 and "'name: value'" in err
    code, _, err = run(capsys, "route", "GET", "ftp://x/", "--file", resource_file)
    assert code == 2 and "not an http(s) URL" in err


def test_bootstrap_and_file_are_exclusive(capsys, resource_file):
    with pytest.raises(SystemExit) as exc:
        main(["status", "--file", resource_file, "--bootstrap", "x.json"])
    assert exc.value.code == 2


def test_exit_status_of_the_console_command(tmp_path):
    """The real process: a broken bootstrap exits 2 with one line on stderr, no traceback."""
    bad = tmp_path / "bootstrap.json"
    bad.write_text("[]")
    proc = subprocess.run([sys.executable, "-m", "meshcore", "status", "--bootstrap", str(bad), "--target", TARGET],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("meshcore status: bad xDS bootstrap:") and "Traceback" not in proc.stderr
