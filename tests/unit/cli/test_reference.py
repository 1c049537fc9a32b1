"""The reference pages are generated from the code (distillery.cli.reference): every config
field has a description, and the pages in docs/reference say what the code says now."""

from conftest import ROOT

from distillery.cli import reference


def test_every_config_field_has_a_description():
    assert reference.undocumented() == [], "give these fields a description= (it is their reference entry)"


def test_the_generated_pages_are_up_to_date_with_the_code():
    for name, make in reference.PAGES.items():
        page = ROOT / "docs" / "reference" / name
        assert page.read_text() == make(), \
            f"{page} is out of date: python -m distillery.cli.reference docs/reference"


def test_every_command_and_section_is_on_its_page():
    from distillery.cli.main import build_parser
    from distillery.config import PipelineConfig

    cli, config = reference.cli_reference(), reference.config_reference()
    commands = [a for a in build_parser()._actions if a.dest == "command"][0].choices  # noqa: SLF001
    assert all(f"## distillery {name}" in cli for name in commands)
    assert all(f"`{name}" in config for name in PipelineConfig.model_fields)
