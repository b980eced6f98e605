"""Data for pre-training and fine-tuning.

    shards.py         photographs -> WebDataset shards + DALI indices + manifest (the builder)
    make_shards.py    the builder's command line (launch/make_shards.py)
    patches.py        the builder's per-image work: cut, filter, encode (ShardBuildConfig)
    quality.py        flat-region detector and no-reference quality scores used by the builder
    wds.py            the one WebDataset tar writer and DALI index reader/writer
    output.py         a local folder or s3:// prefix that files are published to atomically
    progress.py       the data tools' progress bars (tqdm, rank 0, terminals only)
    urls.py           data.train_urls -> checked shard list (globs, brace ranges, folders, s3://)
    s3.py             boto3 access with retries, multipart uploads and errors that name the URL
    pipeline.py       the DALI pre-training loader (build_pretrain_loader)
    pipeline_recovery.py  the DALI loaders' corrupt-sample recovery (a mixin of pipeline.py's loader)
    shard_samples.py  single samples of a shard: index look-ups, decode checks (corrupt samples)
    dali_torch.py     DALI batches -> torch tensors
    degrade.py        the degradation/mask recipe of pre-training
    synthetic.py      synthetic photographs and fine-tuning demo data for tests and the quickstart
    paired_base.py    paired fine-tuning data: task folders, pairing rules, the loaders' base class
    paired.py         the folder loader, build_finetune_loader, ``python -m dyntrain.data.finetune.paired``
    paired_shards.py  paired WebDataset shards: packing and the DALI loader (data.source: paired_shards)
    synthetic_pairs.py   data.source: synthetic, folder form (and the choice of form)
    synthetic_shards.py  data.source: synthetic, shards form (the pre-training DALI reader + MiOIR tasks)
    degradations/     the seven MiOIR degradations

Image files, extensions and decoding: ``dyntrain.images``; seeds: ``dyntrain.seeds``.
Nothing is imported here, so that DALI is only loaded by the code that uses it.
"""
