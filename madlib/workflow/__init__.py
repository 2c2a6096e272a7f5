"""The book's workflow: one notebook through papermill and the book (:mod:`.runner`), parameter checks
(:mod:`.params`), the real-model grid as jobs (:mod:`.grid`) and the browser check of the built book
(:mod:`.browsercheck`)."""
