"""The models: the zoo's tokenizer (:mod:`.tokenizer`), base pretraining (:mod:`.pretrain`), quirky
fine-tuning with LoRA (:mod:`.quirky`, :mod:`.lora`), plain fine-tuning (:mod:`.finetune`), the zoo's
registry (:mod:`.zoo`) and hub models in the zoo's interface (:mod:`.hub`)."""
