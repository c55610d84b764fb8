"""The demo page (fault hunt 17): a missing adapter after others, GRADIO_SERVER_NAME holding an IPv6 address."""

from __future__ import annotations

import os

import pytest

from tests import test_app

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from m2ist import app as m2ist_app
from m2ist.model import SideTunedModel

adapter_dir = test_app.adapter_dir


def test_a_missing_adapter_after_others_is_found_before_any_loads(adapter_dir, tmp_path, monkeypatch):
    """`--adapter good=... --adapter gone=./typo` loaded the first adapter (minutes for real towers), then failed."""
    loaded = []
    real = SideTunedModel.from_pretrained.__func__

    def counting(cls, target, *args, **kwargs):
        loaded.append(target)
        return real(cls, target, *args, **kwargs)

    monkeypatch.setattr(SideTunedModel, "from_pretrained", classmethod(counting))
    for gone in (str(tmp_path / "gone"), "./adapters/typo", "bad repo id"):
        with pytest.raises(FileNotFoundError, match=r"adapter 'gone' \(.*\) cannot be loaded: no such folder, and it "
                                                    r"is not a Hub repo id"):
            m2ist_app.load_models([f"good={adapter_dir}", f"gone={gone}"])
    assert loaded == []
    # a well-formed repo id is left to the Hub (here: no network, nothing cached, so loading it fails there)
    with pytest.raises(OSError):
        m2ist_app.load_models([f"good={adapter_dir}", "hub=owner/not-cached"], local_files_only=True)
    assert loaded == [str(adapter_dir), "owner/not-cached"]


def test_an_ipv6_gradio_server_name_is_refused(monkeypatch):
    """serve(host=None) takes GRADIO_SERVER_NAME, which was not checked: an IPv6 address there failed in gradio."""
    monkeypatch.setenv("GRADIO_SERVER_NAME", "::1")
    with pytest.raises(ValueError, match=r"GRADIO_SERVER_NAME '::1' is an IPv6 address"):
        m2ist_app.serve([], host=None, block=False, quiet=True)
