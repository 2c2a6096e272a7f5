"""The quirky datasets: generated rules and templates (:mod:`.datasets`), the reading texts the zoo's
bases pretrain on (:mod:`.reading`), and the hub datasets of the real-model grid (:mod:`.hub`)."""
