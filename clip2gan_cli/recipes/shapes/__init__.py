"""The builtin `shapes` pack's recipe, stage by stage (`build` runs them all, resumably):

    clip      the tiny open_clip CLIP, contrastive on (image, caption) pairs of the domain
    checker   an independent attribute CNN that measures generated images (monitoring, bench)
    gan       the StyleGAN2 G and D: decoder, mapping code, adversarial stages
    build     every stage, the mapper (`clip2gan train --config mapper.toml`) and the pack files

Run as `python -m clip2gan_cli.recipes.shapes.build --workdir W --pack-dir P`; docs/shapes_pack.md has
the measurements behind each setting.
"""
