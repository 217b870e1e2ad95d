"""torch.fx patches `nn.Module.__call__` and `__getattr__` for the whole process while it traces:
in a server, another visitor's model run during an export's trace went through the tracer and
failed ("module is not installed as a submodule"). The project's tracer leaves other threads alone."""
import threading

import torch
from torch import nn

from spiq.graph.trace import LeafTracer, trace
from spiq.models.toy import toy_cnn

ORIGINAL_CALL = nn.Module.__call__


def _run_while_tracing(runner_model: nn.Module, traced_model: nn.Module, traces: int = 20):
    """Run `runner_model` in a thread for as long as the main thread traces `traced_model`: the
    runner's errors and whether each of its outputs equalled the reference."""
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = runner_model(x)
    errors, same, done = [], [], threading.Event()

    def runner():
        while not done.is_set():
            try:
                with torch.no_grad():
                    same.append(torch.equal(runner_model(x), reference))
            except Exception as exc:   # what the race raised in the visitor's request
                errors.append(exc)
                return

    thread = threading.Thread(target=runner)
    thread.start()
    try:
        for _ in range(traces):
            trace(traced_model)
    finally:
        done.set()
        thread.join()
    return errors, same


def test_a_model_runs_correctly_in_another_thread_while_one_is_traced():
    traced, runner = toy_cnn()[0].eval(), toy_cnn()[0].eval()
    errors, same = _run_while_tracing(runner, traced)
    assert not errors, errors[0]
    assert same and all(same)
    assert nn.Module.__call__ is ORIGINAL_CALL


def test_the_traced_model_itself_may_run_in_another_thread():
    # the shared float model is traced (export, a new recipe) while another visitor runs it:
    # without the guard its calls would become nodes of the graph being traced
    model = toy_cnn()[0].eval()
    reference = trace(model).graph
    errors, same = _run_while_tracing(model, model)
    assert not errors, errors[0]
    assert all(same)
    assert str(trace(model).graph) == str(reference)


def test_traces_from_many_threads_each_get_their_graph_and_leave_torch_as_it_was():
    models = [toy_cnn()[0].eval() for _ in range(4)]
    expected = [str(trace(m).graph) for m in models]
    got, errors = {}, []

    def tracer(i):
        try:
            for _ in range(5):
                got[i] = str(LeafTracer().trace(models[i]))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=tracer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert [got[i] for i in range(4)] == expected
    assert nn.Module.__call__ is ORIGINAL_CALL
