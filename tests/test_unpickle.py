"""A weights file whose pickle calls something is refused in one line naming the call, and the
call is never made."""

import os
import pickle
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch

from wnconvert.convert.errors import UserInputError
from wnconvert.models.zoo.unpickle import pickle_globals
from wnconvert.models.zoo.zoo import load_state_file


class Payload:
    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return (self.call, (self.arg,))


def _write(path, form, payload):
    state = {"conv.weight": torch.zeros(2, 2), "x": payload}
    if form == "zip":
        torch.save(state, path)
    elif form == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:  # a plain pickle, protocol 4: torch warns on stderr and fails on an opcode first
        with open(path, "wb") as f:
            pickle.dump(state, f, protocol=4)
    return path


def test_a_pickle_calling_os_system_is_refused_in_one_line_and_not_run(tmp_path):
    marker = tmp_path / "marker"
    evil = _write(tmp_path / "evil.pth", "raw", Payload(os.system, f"touch {marker}"))
    p = subprocess.run([sys.executable, "-m", "wnconvert.cli", "finetune", "resnet18", "--weights", str(evil),
                        "--num-classes", "10", "--epochs", "0", "--out", str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 2
    assert p.stderr.splitlines() == [f"wnconvert: error: refusing to unpickle {evil}: it calls posix.system "
                                     "(only tensors and plain containers are allowed)"]
    assert not marker.exists()


@pytest.mark.parametrize("form", ["zip", "legacy", "raw"])
@pytest.mark.parametrize("call,name", [(os.system, "posix.system"), (eval, "builtins.eval"),
                                       (subprocess.check_call, "subprocess.check_call")])
def test_every_file_form_names_the_call(tmp_path, capfd, form, call, name):
    marker = tmp_path / "marker"
    arg = f"open({str(marker)!r}, 'w')" if call is eval else (["touch", str(marker)] if call is not os.system
                                                             else f"touch {marker}")
    evil = _write(tmp_path / "evil.pth", form, Payload(call, arg))
    with pytest.raises(UserInputError) as e:
        load_state_file(evil)
    assert str(e.value) == f"refusing to unpickle {evil}: it calls {name} " \
                           "(only tensors and plain containers are allowed)"
    assert not marker.exists()
    assert capfd.readouterr() == ("", "")  # no torch warning


def test_plain_state_dicts_still_load(tmp_path):
    state = OrderedDict(w=torch.arange(6.0).reshape(2, 3))
    for form in ("zip", "legacy"):
        path = tmp_path / f"{form}.pth"
        torch.save(state, path, _use_new_zipfile_serialization=form == "zip")
        got = load_state_file(path)
        assert list(got) == ["w"] and torch.equal(got["w"], state["w"])


def test_pickle_globals_lists_without_running():
    data = pickle.dumps([OrderedDict(), Payload(os.system, "exit 1")], protocol=4)
    assert pickle_globals(data) == ["collections.OrderedDict", "posix.system"]
    assert pickle_globals(pickle.dumps(Payload(os.system, "x"), protocol=2)) == ["posix.system"]
    assert pickle_globals(pickle.dumps(Payload(eval, "x"), protocol=2)) == ["builtins.eval"]
