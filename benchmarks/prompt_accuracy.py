"""Text-to-image class accuracy: does a model trained on the embedded captions (digits, mnist,
fashion) draw the class a prompt names? Samples for prompts naming each class are classified by
the dataset's domain network (the same one behind FID and `nrdm eval`), once per caption template
seen in training and once per phrasing never seen in training.

    nrdm train digits --out runs/t2i-digits --set model.text_encoder=minilm --set data.captions=true
    python benchmarks/prompt_accuracy.py runs/t2i-digits [--n 200] [--cfg 3.0]

Prints the domain network's held-out accuracy on real images (its ceiling), then per template the
accuracy on samples, and the mean over seen and unseen templates.
"""
import argparse
from dataclasses import replace
import time
from pathlib import Path

import torch

from nrdm.data.captions import class_caption, indefinite_article
from nrdm.data.registry import dataset_spec
from nrdm.factory import load_run, output_kwargs, text_encoder
from nrdm.metrics.features import domain_network
from nrdm.sampling import generate, grid_labels

# phrasings that appear in no training caption (the class word or numeral is all they share)
UNSEEN = {
    "digits": ("an image of the number {word}", "{digit}", "a picture showing {article} {word}"),
    "fashion": ("an image of {article} {word}", "{word}", "a catalogue picture of {article} {word}"),
}


def unseen_caption(dataset: str, label: int, template: str) -> str:
    word = dataset_spec(dataset).class_words[label]
    return template.format(article=indefinite_article(word), word=word, digit=label)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--n", type=int, default=200, help="samples per template (classes balanced)")
    parser.add_argument("--sampler")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--cfg", type=float)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    cfg, model, schedule, ckpt = load_run(Path(args.run))
    if not (model.text_dim and cfg.data.captions):
        raise SystemExit(f"{args.run} is not a text model trained on embedded captions (model.text_encoder + data.captions)")
    dataset = "fashion" if cfg.data.name == "fashion" else "digits"
    net = domain_network(cfg.data)
    print(f"{net.name}: held-out real accuracy {net.meta['test_accuracy']:.3f}")
    s = replace(cfg.sample, sampler=args.sampler or cfg.sample.sampler, steps=args.steps or cfg.sample.steps,
                cfg_scale=cfg.sample.cfg_scale if args.cfg is None else args.cfg, seed=args.seed)
    sampler, steps, cfg_scale = s.sampler, s.steps, s.cfg_scale
    print(f"{args.n} samples per template from {ckpt} ({sampler}, {steps} steps, cfg {cfg_scale}, seed {args.seed})")

    labels = grid_labels(args.n, 10)
    seen = range(len(dataset_spec(dataset).caption_templates))
    rows = [("seen", lambda k, t=t: class_caption(dataset, k, t)) for t in seen]
    rows += [("unseen", lambda k, t=t: unseen_caption(dataset, k, t)) for t in UNSEEN[dataset]]
    accuracy: dict[str, list[float]] = {"seen": [], "unseen": []}
    for kind, caption in rows:
        prompts = [caption(int(k)) for k in labels]
        start = time.time()
        images = generate(model, schedule, args.n, text_encoder(cfg)(prompts), s, **output_kwargs(cfg))
        pred = torch.from_numpy(net(images)["probs"]).argmax(1)
        acc = float((pred == labels).float().mean())
        accuracy[kind].append(acc)
        print(f"  {kind:<6} {acc:6.3f}  e.g. {prompts[7]!r:<44} ({time.time() - start:.0f}s)")
    for kind, values in accuracy.items():
        print(f"mean over {len(values)} {kind} templates: {sum(values) / len(values):.3f}")


if __name__ == "__main__":
    main()
