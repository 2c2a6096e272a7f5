"""The models: the zoo's tokenizer and any model's prompts as token ids (:mod:`.tokenizer`), the
training primitives the zoo and fine-tuning share (:mod:`.training`), base pretraining
(:mod:`.pretrain`), quirky fine-tuning with LoRA (:mod:`.quirky`, :mod:`.lora`), plain fine-tuning
(:mod:`.finetune`), the zoo's registry and records (:mod:`.zoo`), hub models in the zoo's interface
(:mod:`.hub`), residual-stream hook names (:mod:`.hooks`) and the typed record every loader attaches
to a model (:mod:`.info`)."""
