"""Errors a user's input causes share one base, and only they are shown as messages: anything else
is a bug and keeps its traceback."""
import pytest

from spiq.core.errors import SpiqError, UnknownNameError


def test_every_error_for_user_input_is_a_spiq_error():
    import spiq
    from spiq.cli.common import UsageError
    from spiq.core.devices import DeviceError
    from spiq.graph.trace import GraphError
    from spiq.models.vit import TransformerError
    from spiq.ui.limits import ServerBusy

    for cls in (spiq.ConfigError, spiq.ImageError, spiq.DatasetError, spiq.ExportError, spiq.ModelUnavailableError,
                TransformerError, GraphError, UsageError, DeviceError, ServerBusy):
        assert issubclass(cls, SpiqError), cls
    assert str(UnknownNameError("unknown model 'x'")) == "unknown model 'x'"   # not KeyError's quoted repr


def test_the_cli_shows_user_errors_and_lets_bugs_through(monkeypatch, capsys):
    from spiq import cli
    from spiq.cli import export

    assert cli.main(["export", "--model", "efficientnet_lite9", "--method", "spiq", "--out", "x.onnx"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spiq: error: unknown model 'efficientnet_lite9'") and "efficientnet_lite0" in err

    def bug(args):
        return {}["a key the code forgot"]

    monkeypatch.setattr(export, "run_export", bug)   # add() reads it when main() builds the parser
    with pytest.raises(KeyError):
        cli.main(["export", "--model", "efficientnet_lite0", "--method", "spiq", "--out", "x.onnx"])
