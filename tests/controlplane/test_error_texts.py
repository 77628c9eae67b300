"""Error texts name the file once and carry no pseudo field ("field (document)")."""

from __future__ import annotations

import subprocess
import sys

import pytest

from meshcore.errors import ConfigError
from meshcore.xds.resource_file import load_resource_file


@pytest.mark.parametrize("content,expect", [(None, "cannot read: No such file or directory"),
                                            ("listeners: [\n", "invalid YAML/JSON: line 2, column 1")])
def test_resource_file_errors_name_the_file_once(tmp_path, content, expect):
    path = tmp_path / "mesh.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_resource_file(path)
    text = str(info.value)
    assert text.count(str(path)) == 1 and expect in text and "field (" not in text, text
    cli = subprocess.run([sys.executable, "-m", "meshcore", "control-plane", "--resources", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode != 0
    line = cli.stderr.strip().splitlines()[-1]
    assert line.count(str(path)) == 1 and expect in line and "field (" not in line and "Traceback" not in cli.stderr


def test_config_error_keeps_real_fields():
    assert str(ConfigError("c", "lb_policy", "bad")) == "c: field lb_policy: bad"
    assert str(ConfigError("f.yaml", "(document)", "bad")) == "f.yaml: bad"
