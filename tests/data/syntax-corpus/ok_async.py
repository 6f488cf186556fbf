async def f():
    async with a as b:
        await b
    async for i in c:
        yield i
