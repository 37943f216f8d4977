"""Model-to-model operations (convert, merge, grow, slice, ...): each copies or edits in place, as it says."""
