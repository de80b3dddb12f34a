def main():
    raise SystemExit("hf-qvar: no command yet")
