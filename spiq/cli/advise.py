"""`spiq advise`: per-layer widths under an average-bits budget, chosen on distilled images only."""
from __future__ import annotations

from spiq.cli.common import bits, build_config, check_output, percent_bar, widths, write_json, write_text
from spiq.config import METHODS, ConfigError


def run_advise(args) -> int:
    from spiq.analysis.advise import advise, check_budget, check_widths
    from spiq.analysis.sensitivity import sensitivity
    from spiq.models.registry import load_model

    config = build_config(args)
    if config is None:
        raise ConfigError("advise chooses quantized widths: give a quantization method, not fp")
    chosen = check_widths(args.widths)
    check_budget(args.budget, chosen)
    if args.weight_budget is not None:
        check_budget(args.weight_budget, chosen, "--weight-budget")
    check_output(args.out, "--out")
    check_output(args.json, "--json")
    loaded = load_model(args.model)   # unknown model: one line, before any work
    with percent_bar(f"sensitivity of {args.model} on distilled images") as progress:
        table = sensitivity(loaded, config, chosen, progress=progress)
    advice = advise(table, config, args.budget, chosen, args.weight_budget)
    write_text(args.out, advice.config.to_json() + "\n", "--out")
    print(f"advised {args.model}: average input width {advice.input_budget_used:.3f} bits (budget {args.budget}), "
          f"weights {advice.weight_budget_used:.3f}, predicted logit SQNR {advice.predicted_sqnr_db:.1f} dB "
          f"on distilled images; recipe {args.out}")
    if args.json:
        write_json(args.json, {"model": args.model, "budget": args.budget, "weight_budget": args.weight_budget,
                               "widths": chosen, **advice.to_dict()})
    return 0


def add(sub) -> None:
    a = sub.add_parser("advise", help="per-layer widths under an average-bits budget, from distilled images only")
    a.add_argument("--model", required=True, help="a name from `spiq models`")
    a.add_argument("--method", choices=list(METHODS), help="the quantization method (or --config)")
    a.add_argument("--wbits", type=bits, help="weight bits (2-16): every layer's without --weight-budget")
    a.add_argument("--abits", type=bits, help="the recipe's model-wide input bits; layers that differ are overrides")
    a.add_argument("--config", help="QuantConfig JSON to start from; --method/--wbits/--abits override its fields")
    a.add_argument("--budget", type=float, required=True,
                   help="average input bits, weighted by each layer's input values per image")
    a.add_argument("--weight-budget", type=float, help="also choose weight widths: average bits by weight count")
    a.add_argument("--widths", type=widths, default=[4, 5, 6, 8], help="widths to choose from (default 4,5,6,8)")
    a.add_argument("--out", required=True, help="the recipe JSON to write (for evaluate/export --config)")
    a.add_argument("--json", help="write the budget used and the predicted logit SQNR as JSON here")
    a.set_defaults(func=run_advise, calib_n=None)
