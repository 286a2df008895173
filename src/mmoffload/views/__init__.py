"""Views of artifacts for people: ``show`` (one record with field names) and the HTML pages."""
