"""Data for pre-training and fine-tuning.

    shards.py     photographs -> WebDataset shards + DALI indices + manifest (launch/make_shards.py)
    quality.py    flat-region detector and no-reference quality scores used by the shard builder
    urls.py       data.train_urls -> checked shard list (globs, brace ranges, folders, s3://)
    s3.py         boto3 access with retries, multipart uploads and errors that name the URL
    pipeline.py   the DALI pre-training loader (build_pretrain_loader)
    degrade.py    the degradation/mask recipe of pre-training
    synthetic.py  synthetic photographs for tests and the quickstart
    paired.py     paired fine-tuning data (build_finetune_loader)
    paired_shards.py  paired WebDataset shards: packing and the DALI loader (data.source: paired_shards)

Nothing is imported here, so that DALI is only loaded by the code that uses it.
"""
